#!/usr/bin/env bash
# On an NVIDIA host: inventory, one /metrics scrape of the agent on NVML, a read-only
# partition plan for the example spec, and the collection sweep timed against raw NVML
# calls. Needs a prebuilt x86-64 hearth (cargo build --release --bin hearth) at $HEARTH.
#
# Read-only by construction: it only runs `hearth gpu inventory|metrics|bench`,
# `hearth partition plan` and the agent with no partition spec. It never changes MIG mode,
# never creates or destroys GPU/compute instances, never resets a GPU.
set -euo pipefail
HEARTH=${HEARTH:-target/release/hearth}
OUT=${OUT:-$(mktemp -d)}
ROUNDS=${ROUNDS:-300}
mkdir -p "$OUT"

section() { printf '\n== %s\n' "$*"; }

section "host"
date -u +%Y-%m-%dT%H:%M:%SZ
uname -r
nvidia-smi --query-gpu=index,name,driver_version,mig.mode.current,memory.total --format=csv 2>/dev/null || echo "(nvidia-smi not available)"

section "hearth gpu inventory"
"$HEARTH" gpu inventory
"$HEARTH" gpu inventory --json > "$OUT/inventory.json"

section "agent /metrics (NVML backend, node-local, one scrape)"
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
cat > "$work/agent.yaml" <<YAML
node_name: gpu-check
http_listen: 127.0.0.1:$port
devices: {backend: nvml, collect_interval: 1s, pod_resources_dir: $work/pod-resources}
cache: {root: $work/cache}
YAML
"$HEARTH" agent --config "$work/agent.yaml" > "$OUT/agent.log" 2>&1 &
agent=$!
trap 'kill $agent 2>/dev/null || true; rm -rf "$work"' EXIT
fetch() {
  if command -v curl >/dev/null; then curl -fsS "http://127.0.0.1:$port$1"
  else python3 -c "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port$1').read().decode())"; fi
}
for _ in $(seq 1 50); do fetch /healthz >/dev/null 2>&1 && break; sleep 0.2; done
sleep 2.5 # two sweeps, so GPM has a pair of samples
fetch /metrics > "$OUT/metrics.txt"
grep -E '^(# TYPE )?(DCGM_|hearth_gpu_)' "$OUT/metrics.txt"
kill $agent; wait $agent 2>/dev/null || true

section "MIG placements: NVML vs the planner's table (read-only)"
"$HEARTH" gpu profiles || true

section "hearth partition plan (read-only)"
for cfg in balanced balanced-h200 all-disabled; do
  "$HEARTH" partition plan --spec manifests/examples/mig-spec.yaml --config "$cfg" || true
done

section "collection sweep vs raw NVML calls ($ROUNDS interleaved rounds)"
"$HEARTH" gpu bench --rounds "$ROUNDS"
