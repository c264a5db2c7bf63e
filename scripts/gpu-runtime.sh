#!/usr/bin/env bash
# Runs Hearth's runtime path on a real GPU: the agent (NVML for the GPU's metrics, read-only)
# caches a small random-weight model it prefetches from a local directory, starts a PyTorch
# model server on it as an agent-managed runtime, reads its health and load, serves one
# completion, then drains it on SIGTERM. Never touches MIG mode or resets the GPU.
#   scripts/gpu-runtime.sh HEARTH_BINARY OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
hearth=$1; out=$2; work=$(mktemp -d)
mkdir -p "$out"
python3 tests/engines/torch_engine.py --make-model "$work/src-model" | tee "$out/make-model.txt"
port=18080
cat > "$work/agent.yaml" <<YAML
node_name: gpu-host
http_listen: 127.0.0.1:19400
state_dir: $work/state
shutdown_grace: 30s
devices: {backend: nvml, collect_interval: 2s}
network: {enabled: false}
cache: {root: $work/cache}
runtimes:
  interval: 1s
  managed:
    - name: tiny
      engine: vllm
      model_name: tiny
      model: {uri: "file://$work/src-model"}
      port: $port
      visible_devices: "0"
      ready_timeout: 5m
      drain_timeout: 20s
      command: [python3, "$PWD/tests/engines/torch_engine.py", --port, "{port}", --model, tiny, --model-dir, "{model_dir}"]
YAML
ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)
"$hearth" agent --config "$work/agent.yaml" > "$out/agent.log" 2>&1 &
agent=$!
ready=""
for _ in $(seq 1 600); do
  if curl -fsS http://127.0.0.1:19400/metrics 2>/dev/null | grep -q 'hearth_runtime_state{runtime="tiny",model="tiny",engine="vllm",state="ready"} 1'; then ready=1; break; fi
  sleep 0.2
done
t1=$(ms)
echo "agent start to runtime ready: $((t1 - t0)) ms (ready=$ready)" | tee "$out/summary.txt"
for i in 1 2 3 4 5; do
  curl -fsS -X POST http://127.0.0.1:$port/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Hearth on a GPU", "max_tokens": 32}' >> "$out/completions.jsonl"; echo >> "$out/completions.jsonl"
done
sleep 3
curl -fsS http://127.0.0.1:19400/metrics > "$out/agent-metrics.txt" || true
grep -E '^hearth_runtime_|^DCGM_FI_DEV_(GPU_UTIL|FB_USED|POWER_USAGE)' "$out/agent-metrics.txt" >> "$out/summary.txt" || true
kill -TERM $agent
t2=$(ms)
rc=0; wait $agent || rc=$?
t3=$(ms)
echo "agent exit $rc, stopped (server drained) in $((t3 - t2)) ms" | tee -a "$out/summary.txt"
cp "$work/state/runtimes/tiny/server.log" "$out/server.log" || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.txt" || true
