#!/usr/bin/env bash
# The README's first command: installs what building Hearth needs beyond Rust (clang, for
# the agent's BPF programs) if it is missing, then runs `hearth local` (controller + agent
# with simulated GPUs on loopback). Arguments go to `hearth local`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang >/dev/null; then
  echo "installing: clang (builds the agent's BPF programs)"
  if [ "$(id -u)" -eq 0 ]; then s=(); else s=(sudo); fi
  "${s[@]}" apt-get update -qq
  "${s[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang
fi
exec cargo run --bin hearth -- local "$@"
