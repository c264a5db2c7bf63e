#!/usr/bin/env bash
# Builds Hearth's container image without Docker and without a registry: a minimal Debian
# bookworm root filesystem made by mmdebstrap from the Debian mirror this machine's apt
# uses, plus the `hearth` agent and `hearth-controller` binaries, packed with umoci as an
# OCI image (two layers: the Debian base, cached and shared between versions, then the
# binaries). The Dockerfile builds the same image where Docker and base images are at hand;
# keep the two in step (paths, packages, entrypoint, labels).
#
# Usage (as root: mmdebstrap runs in root mode):
#   scripts/build-image.sh                        # cargo build --release, then the image
#   scripts/build-image.sh --bin-dir target/debug # use binaries already built there
#
# Options:
#   --bin-dir DIR     take hearth and hearth-controller from DIR instead of building them
#   --out DIR         output directory [target/image]
#   --cache DIR       where the Debian root filesystem is cached [OUT/cache]
#   --name NAME       image name without tag, for `ctr images import --base-name` (the
#                     OCI layout holds only the tag) [ghcr.io/hearth-dev/hearth]
#   --tag TAG         [the workspace version from Cargo.toml]
#   --variant V       mmdebstrap variant: essential (default, smallest that has what
#                     ca-certificates' scripts need) or minbase (adds apt)
#   --sources FILE    apt sources (one-line or deb822) for the Debian base [the first Debian
#                     one of this machine's apt sources; else deb.debian.org]
#   --refresh-base    rebuild the cached Debian root filesystem (e.g. for security updates)
#   --keep-debug-info ship the binaries as built. By default their DWARF (the release
#                     profile's line tables: about 80% of their size) is moved to
#                     OUT/debug/*.debug, linked by .gnu_debuglink; symbols stay, so
#                     backtraces still name functions, and gdb or addr2line with the
#                     .debug file gives file and line.
#
# Writes OUT/oci (an OCI image layout, tag TAG) and OUT/hearth-oci.tar (the same as an OCI
# archive: `ctr images import --base-name NAME OUT/hearth-oci.tar`,
# `skopeo copy oci-archive:OUT/hearth-oci.tar docker://...`). The Debian root filesystem is
# cached under OUT/cache, keyed by everything that goes into it; the second run only
# repacks the binaries. SOURCE_DATE_EPOCH (default: the last commit's time) fixes the
# timestamps of the binaries layer, the image config and the archive, so the same inputs
# give the same image digest.
set -euo pipefail
die() { echo "build-image: $*" >&2; exit 1; }
args=("$@")
# Paths on the command line are the caller's; the script works from the repository root.
caller_pwd=$PWD
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$caller_pwd/$1" ;; esac; }
cd "$(dirname "$0")/.."

bin_dir=""
out="target/image"
cache=""
name="ghcr.io/hearth-dev/hearth"
tag=""
variant="essential"
refresh_base=0
keep_debug=0
sources=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$(abs "${2:?--bin-dir needs a directory}"); shift 2 ;;
    --out) out=$(abs "${2:?--out needs a directory}"); shift 2 ;;
    --cache) cache=$(abs "${2:?--cache needs a directory}"); shift 2 ;;
    --name) name="${2:?--name needs an image name}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
    --variant) variant="${2:?--variant needs essential or minbase}"; shift 2 ;;
    --sources) sources=$(abs "${2:?--sources needs a file}"); shift 2 ;;
    --refresh-base) refresh_base=1; shift ;;
    --keep-debug-info) keep_debug=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$variant" in essential|minbase) ;; *) die "--variant: expected essential or minbase, got $variant" ;; esac

[ "$(id -u)" -eq 0 ] || die "must run as root: mmdebstrap builds the Debian root filesystem in root mode (sudo $0 ${args[*]})"
missing=()
for tool in mmdebstrap umoci perl tar gzip sha256sum objcopy; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}; install with: apt-get install -y mmdebstrap umoci (objcopy: binutils)"

version=$(awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && $1 == "version" {gsub(/"/, "", $3); print $3; exit}' Cargo.toml)
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
tag="${tag:-$version}"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

mkdir -p "$out"
out=$(cd "$out" && pwd)

# --- The binaries --------------------------------------------------------------------------
if [ -z "$bin_dir" ]; then
  # The DaemonSet's agent has no local mode (no embedded controller); the controller is its
  # own crate. Two invocations: features are per package.
  cargo build --release --locked -p hearth-agent --no-default-features --bin hearth
  cargo build --release --locked -p hearth-controller --bin hearth-controller
  bin_dir="target/release"
fi
for b in hearth hearth-controller; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b not found or not executable (build it, or pass --bin-dir)"
done

# --- The Debian base ----------------------------------------------------------------------
suite=bookworm
packages="ca-certificates"
# Only Debian's own sources from this machine's apt (other repositories stay out of the image).
if [ -n "$sources" ]; then
  [ -f "$sources" ] || die "--sources: $sources is not a file"
else
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    if [ -f "$f" ] && grep -Eq '^[^#]*(deb\.debian\.org|debian-archive-keyring)' "$f" && grep -Eq "^[^#]*$suite" "$f"; then
      sources="$f"
      break
    fi
  done
fi
if [ -n "$sources" ]; then
  mirror_args=("$sources")
else
  mirror_args=("deb http://deb.debian.org/debian $suite main"
    "deb http://deb.debian.org/debian $suite-updates main"
    "deb http://deb.debian.org/debian-security $suite-security main")
fi
# No manuals, docs (copyright files stay: licenses travel with the binaries), translations.
dpkg_opts=(
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
)
# The host's name and resolver must not leak into the image (the runtime provides both);
# logs, backups and caches from the build are dropped.
# shellcheck disable=SC2016 # $1 is mmdebstrap's, expanded when the hook runs
cleanup_hook='cd "$1" && rm -rf etc/hostname etc/resolv.conf var/log/dpkg.log var/log/apt/* var/log/alternatives.log var/cache/debconf/*-old var/lib/dpkg/*-old var/cache/ldconfig/aux-cache var/lib/apt/extended_states'
mmdebstrap_version=$(mmdebstrap --version 2>/dev/null | head -n1)
mirror_text=$(if [ -n "$sources" ]; then cat "$sources"; else printf '%s\n' "${mirror_args[@]}"; fi)
key=$(printf '%s\n' "$mmdebstrap_version" "$suite" "$variant" "$packages" "${dpkg_opts[@]}" "$cleanup_hook" "$mirror_text" | sha256sum | cut -c1-16)
cache="${cache:-$out/cache}"
base="$cache/debian-$suite-$variant-$key.tar"
mkdir -p "$cache"
if [ "$refresh_base" -eq 1 ] || [ ! -s "$base" ]; then
  echo "== Debian $suite root filesystem ($variant + $packages) from ${sources:-deb.debian.org}"
  start=$(date +%s)
  # The merged-usr hook sets up /usr the way Debian 12 installs do, without pulling the
  # usrmerge package (and perl with it) into the image.
  mmdebstrap --mode=root --variant="$variant" --format=tar --include="$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --skip=output/dev \
    "${dpkg_opts[@]}" --customize-hook="$cleanup_hook" \
    "$suite" "$base.tmp.$$" "${mirror_args[@]}" >"$base.log" 2>&1 \
    || { rm -f "$base.tmp.$$"; tail -n 30 "$base.log" >&2; die "mmdebstrap failed (log: $base.log)"; }
  # Renamed into place whole: a concurrent build sees the old tarball or the new one.
  mv "$base.tmp.$$" "$base"
  echo "   $(($(date +%s) - start)) s, cached as $base"
else
  echo "== Debian $suite root filesystem: cached $base"
fi

# --- The binaries layer ---------------------------------------------------------------------
stage="$out/stage"
rm -rf "$stage"
mkdir -p "$stage/usr/local/bin"
install -m 0755 "$bin_dir/hearth" "$bin_dir/hearth-controller" "$stage/usr/local/bin/"
if [ "$keep_debug" -eq 0 ]; then
  mkdir -p "$out/debug"
  for b in hearth hearth-controller; do
    objcopy --only-keep-debug "$stage/usr/local/bin/$b" "$out/debug/$b.debug"
    # --add-gnu-debuglink names the .debug file (and its CRC) from the current directory.
    (cd "$out/debug" && objcopy --strip-debug --add-gnu-debuglink="$b.debug" "$stage/usr/local/bin/$b")
  done
fi
bins_tar="$out/binaries.tar"
tar --create --file "$bins_tar" --directory "$stage" --sort=name --mtime="@$SOURCE_DATE_EPOCH" \
  --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  usr/local/bin/hearth usr/local/bin/hearth-controller

# --- The OCI image --------------------------------------------------------------------------
echo "== OCI image $name:$tag"
layout="$out/oci"
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci raw add-layer --image "$layout:$tag" --history.created "$created" \
  --history.created_by "mmdebstrap --variant=$variant --include=$packages $suite" "$base"
umoci raw add-layer --image "$layout:$tag" --history.created "$created" \
  --history.created_by "hearth and hearth-controller $version into /usr/local/bin" "$bins_tar"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
umoci config --image "$layout:$tag" --created "$created" --history.created "$created" \
  --history.created_by "entrypoint, environment, labels" \
  --architecture "$(dpkg --print-architecture)" --os linux \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.entrypoint /usr/local/bin/hearth --config.cmd agent \
  --config.label "org.opencontainers.image.title=hearth" \
  --config.label "org.opencontainers.image.description=Hearth node agent (hearth) and controller (hearth-controller)" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.revision=$revision" \
  --config.label "org.opencontainers.image.licenses=Apache-2.0" \
  --config.label "org.opencontainers.image.source=https://github.com/hearth-dev/hearth"
umoci gc --layout "$layout"
archive="$out/hearth-oci.tar"
tar --create --file "$archive.tmp.$$" --directory "$layout" --sort=name --mtime="@$SOURCE_DATE_EPOCH" \
  --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  oci-layout index.json blobs
mv "$archive.tmp.$$" "$archive"

# --- Sizes ----------------------------------------------------------------------------------
# Compressed: what a node pulls (the manifest's layers). Unpacked: the layers' tar streams,
# about what the image takes on a node's disk.
perl -MJSON::PP -e '
  my ($layout, $tag, $base, $bins, $archive) = @ARGV;
  sub slurp { local $/; open my $f, "<", $_[0] or die "$_[0]: $!"; my $t = <$f>; $t }
  sub blob { my ($d) = @_; $d =~ s/:/\//; "$layout/blobs/$d" }
  my ($m) = grep { ($_->{annotations} // {})->{"org.opencontainers.image.ref.name"} eq $tag }
            @{ decode_json(slurp("$layout/index.json"))->{manifests} };
  die "tag $tag not in index.json\n" unless $m;
  my $manifest = decode_json(slurp(blob($m->{digest})));
  my @layers = map { $_->{size} } @{ $manifest->{layers} };
  my $compressed = 0; $compressed += $_ for @layers;
  my ($ub, $ui) = (-s $base, -s $bins);
  my $mb = sub { sprintf "%.1f MB", $_[0] / 1e6 };
  printf "image %s\n", $m->{digest};
  printf "  compressed (pulled): %s = base %s + binaries %s\n", $mb->($compressed), $mb->($layers[0]), $mb->($layers[1]);
  printf "  unpacked:            %s = base %s + binaries %s\n", $mb->($ub + $ui), $mb->($ub), $mb->($ui);
  printf "  archive:             %s (%s)\n", $archive, $mb->(-s $archive);
' "$layout" "$tag" "$base" "$bins_tar" "$archive"
echo "import: ctr images import --base-name $name $archive   (then: $name:$tag)"
rm -rf "$stage" "$bins_tar"
