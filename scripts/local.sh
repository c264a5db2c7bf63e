#!/usr/bin/env bash
# The README's first command: installs what building Hearth needs beyond Rust (clang for
# the agent's BPF programs, mold as the linker) if it is missing, then runs `hearth local`
# (controller + agent with simulated GPUs on loopback). Arguments go to `hearth local`.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=()
command -v clang >/dev/null || pkgs+=(clang)  # builds the agent's BPF programs
command -v mold >/dev/null || pkgs+=(mold)    # the linker .cargo/config.toml names
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "installing: ${pkgs[*]}"
  if [ "$(id -u)" -eq 0 ]; then s=(); else s=(sudo); fi
  "${s[@]}" apt-get update -qq
  "${s[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
# The same build as the test command's (every binary of the workspace, one feature set), so
# running the tests after this, or this after the tests, rebuilds nothing.
cargo build --workspace --bins --locked
exec target/debug/hearth local "$@"
