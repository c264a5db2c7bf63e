#!/usr/bin/env python3
"""A stand-in model server for tests: vLLM's HTTP surface (/health, /v1/models, /metrics,
/v1/completions) with the failure modes the agent must handle, chosen by flags.

  fake_engine.py --port P --model NAME [--load-seconds S] [--exit-after S] [--exit-code N]
                 [--hang-health] [--ignore-sigterm] [--drain-seconds S] [--model-dir DIR]

It prints what it does on stdout (the agent captures it as the runtime's log).
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
p.add_argument("--port", type=int, required=True)
p.add_argument("--model", default="model")
p.add_argument("--model-dir", default="")
p.add_argument("--load-seconds", type=float, default=0.0)
p.add_argument("--exit-after", type=float, default=0.0)
p.add_argument("--exit-code", type=int, default=1)
p.add_argument("--hang-health", action="store_true")
p.add_argument("--ignore-sigterm", action="store_true")
p.add_argument("--drain-seconds", type=float, default=0.0)
a = p.parse_args()

started = time.time()
state = {"running": 0, "served": 0, "draining": False}
lock = threading.Lock()


def loaded():
    return time.time() - started >= a.load_seconds


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
            if a.hang_health:
                time.sleep(3600)
            return self.send(200, "")
        if self.path == "/v1/models":
            data = [{"id": a.model, "object": "model", "owned_by": "fake"}] if loaded() else []
            return self.send(200, json.dumps({"object": "list", "data": data}))
        if self.path == "/metrics":
            with lock:
                r, n = state["running"], state["served"]
            text = (
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="{a.model}",engine="0"}} {r}.0\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="{a.model}",engine="0"}} 0.0\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{model_name="{a.model}",engine="0"}} 0.1\n'
                "# TYPE vllm:generation_tokens_total counter\n"
                f'vllm:generation_tokens_total{{model_name="{a.model}",engine="0"}} {n * 16}.0\n'
            )
            return self.send(200, text, "text/plain; version=0.0.4")
        self.send(404, "{}")

    def do_POST(self):
        if self.path != "/v1/completions" or not loaded() or state["draining"]:
            return self.send(503, "{}")
        with lock:
            state["running"] += 1
        time.sleep(0.05)
        with lock:
            state["running"] -= 1
            state["served"] += 1
        self.send(200, json.dumps({"object": "text_completion", "choices": [{"text": "ok", "index": 0}]}))


server = ThreadingHTTPServer(("127.0.0.1", a.port), H)


def on_term(signum, frame):
    if a.ignore_sigterm:
        print("SIGTERM ignored", flush=True)
        return
    print(f"SIGTERM: draining for {a.drain_seconds}s", flush=True)
    state["draining"] = True

    def stop():
        time.sleep(a.drain_seconds)
        print("drained, exiting", flush=True)
        os._exit(0)

    threading.Thread(target=stop, daemon=True).start()


signal.signal(signal.SIGTERM, on_term)
if a.exit_after > 0:
    def die():
        time.sleep(a.exit_after)
        print(f"exiting with {a.exit_code}", flush=True)
        os._exit(a.exit_code)
    threading.Thread(target=die, daemon=True).start()
print(f"serving {a.model} from {a.model_dir or '-'} on 127.0.0.1:{a.port} (env CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})", flush=True)
server.serve_forever()
