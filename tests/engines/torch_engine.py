#!/usr/bin/env python3
"""A small OpenAI-compatible model server on PyTorch, for running Hearth's runtime path on a
real GPU without a serving engine installed: loads a causal LM from a weights directory
(config.json + model.safetensors, as `transformers` saves it), serves /health, /v1/models,
/v1/completions (greedy, byte-level prompt ids) and /metrics with vLLM's metric names.

  torch_engine.py --port P --model NAME --model-dir DIR [--device cuda]
  torch_engine.py --make-model DIR   # writes a small random-weight model and exits
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--port", type=int)
p.add_argument("--model", default="model")
p.add_argument("--model-dir")
p.add_argument("--device", default="cuda")
p.add_argument("--make-model")
a = p.parse_args()

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

if a.make_model:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=256, n_embd=256, n_layer=4, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(a.make_model, safe_serialization=True)
    print("wrote", a.make_model, os.listdir(a.make_model), flush=True)
    sys.exit(0)

BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
lock = threading.Lock()
st = {"running": 0, "waiting": 0, "gen": 0, "prompt": 0, "ttft": [0] * (len(BUCKETS) + 1), "ttft_sum": 0.0, "ttft_n": 0, "draining": False}
model = None

t0 = time.time()
print(f"loading {a.model_dir} on {a.device} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})", flush=True)


def load():
    global model
    m = GPT2LMHeadModel.from_pretrained(a.model_dir).to(a.device).eval()
    model = m
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"loaded in {time.time() - t0:.2f}s on {name}", flush=True)


threading.Thread(target=load, daemon=True).start()
gen_lock = threading.Lock()


class H(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, body, ctype="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.send(200, "")
        if self.path == "/v1/models":
            data = [{"id": a.model, "object": "model", "owned_by": "torch"}] if model is not None else []
            return self.send(200, json.dumps({"object": "list", "data": data}))
        if self.path == "/metrics":
            with lock:
                s = dict(st)
                cum, lines = 0, []
                for b, c in zip(BUCKETS + ["+Inf"], st["ttft"]):
                    cum += c
                    lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{b}",model_name="{a.model}"}} {cum}.0')
            kv = torch.cuda.memory_allocated() / max(1, torch.cuda.get_device_properties(0).total_memory) if a.device == "cuda" else 0.0
            text = "\n".join([
                "# TYPE vllm:num_requests_running gauge",
                f'vllm:num_requests_running{{engine="0",model_name="{a.model}"}} {s["running"]}.0',
                "# TYPE vllm:num_requests_waiting gauge",
                f'vllm:num_requests_waiting{{engine="0",model_name="{a.model}"}} {s["waiting"]}.0',
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="{a.model}"}} {kv}',
                "# TYPE vllm:time_to_first_token_seconds histogram",
                *lines,
                f'vllm:time_to_first_token_seconds_sum{{engine="0",model_name="{a.model}"}} {s["ttft_sum"]}',
                f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="{a.model}"}} {s["ttft_n"]}.0',
                "# TYPE vllm:prompt_tokens_total counter",
                f'vllm:prompt_tokens_total{{engine="0",model_name="{a.model}"}} {s["prompt"]}.0',
                "# TYPE vllm:generation_tokens_total counter",
                f'vllm:generation_tokens_total{{engine="0",model_name="{a.model}"}} {s["gen"]}.0',
                "",
            ])
            return self.send(200, text, "text/plain; version=0.0.4")
        self.send(404, "{}")

    def do_POST(self):
        if self.path != "/v1/completions" or model is None or st["draining"]:
            return self.send(503, "{}")
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        ids = list(req.get("prompt", "hello").encode()[:128]) or [0]
        n = int(req.get("max_tokens", 16))
        with lock:
            st["waiting"] += 1
        with gen_lock:
            with lock:
                st["waiting"] -= 1
                st["running"] += 1
            t = time.time()
            x = torch.tensor([ids], device=a.device)
            out = []
            with torch.no_grad():
                for i in range(n):
                    nxt = int(model(x).logits[0, -1].argmax())
                    if i == 0:
                        ttft = time.time() - t
                    out.append(nxt)
                    x = torch.cat([x, torch.tensor([[nxt]], device=a.device)], dim=1)
            with lock:
                st["running"] -= 1
                st["gen"] += n
                st["prompt"] += len(ids)
                k = next((j for j, b in enumerate(BUCKETS) if ttft <= b), len(BUCKETS))
                st["ttft"][k] += 1
                st["ttft_sum"] += ttft
                st["ttft_n"] += 1
        text = bytes(b % 256 for b in out).decode("latin-1")
        self.send(200, json.dumps({"object": "text_completion", "model": a.model, "choices": [{"index": 0, "text": text}],
                                   "usage": {"prompt_tokens": len(ids), "completion_tokens": n}, "ttft_seconds": ttft}))


server = ThreadingHTTPServer(("127.0.0.1", a.port), H)


def on_term(signum, frame):
    print("SIGTERM: draining", flush=True)
    st["draining"] = True

    def stop():
        while st["running"] or st["waiting"]:
            time.sleep(0.05)
        print("drained, exiting", flush=True)
        os._exit(0)

    threading.Thread(target=stop, daemon=True).start()


signal.signal(signal.SIGTERM, on_term)
print(f"serving {a.model} on 127.0.0.1:{a.port}", flush=True)
server.serve_forever()
