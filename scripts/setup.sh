#!/usr/bin/env bash
# Somna's one entry point on a fresh Debian 12 machine (run as root):
#
#   scripts/setup.sh up     install everything, then run `somna up`
#   scripts/setup.sh test   install everything, then run the whole test suite
#   scripts/setup.sh build  install everything, build, and stop
#
# "Everything": Debian packages (apt-get), the release build (crates from
# crates.io), the static guest agent, Debian's cloud kernel and the guest
# initramfs, and the test images built by images/recipes/. Every step is
# idempotent and skips work that is already done.
set -euo pipefail

mode=${1:-build}
case "$mode" in up|test|build) ;; *) echo "usage: scripts/setup.sh up|test|build" >&2; exit 2 ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build"
target="${CARGO_TARGET_DIR:-$root/target}"
cd "$root"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it installs packages, and sandboxes need /dev/kvm or QEMU, loop-free disk images and root-owned files"

# --- system packages ---------------------------------------------------------
packages=(qemu-system-x86 e2fsprogs lz4 kmod cpio file mmdebstrap ca-certificates docker-registry apache2-utils skopeo erofs-utils openssl postgresql busybox-static python3 python3-venv clang llvm libbpf-dev iproute2 nftables conntrack)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  step "apt-get install ${missing[*]:-(package lists only)}"
  apt-get update -qq
  if [ "${#missing[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- Rust toolchain -----------------------------------------------------------
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust stable (1.95 or newer) with rustup"
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
[ "$rustc_minor" -ge 95 ] || die "Rust $(rustc --version) is too old: Somna needs 1.95 or newer"

# --- build ---------------------------------------------------------------------
if [ "$mode" = test ]; then
  # The test build enables the features of every crate and dev-dependency;
  # building the binaries apart first would compile most crates twice.
  step "cargo test --release --workspace --no-run (also builds somna, somna-mkimage)"
  cargo test --release --locked -q --workspace --no-run
else
  step "cargo build --release (somna, somna-mkimage)"
  cargo build --release --locked -q -p somna-cli -p somna-images --bins
fi
step "cargo build --release (static guest agent)"
# --target keeps crt-static off build scripts and proc-macros.
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release --locked -q -p somna-guest-agent --target x86_64-unknown-linux-gnu
agent_bin="$target/x86_64-unknown-linux-gnu/release/somna-guest-agent"

# --- guest kernel and initramfs -------------------------------------------------
step "guest kernel (Debian linux-image-cloud-amd64)"
images/guest/fetch-kernel.sh "$build/kernel"
step "guest initramfs"
mkdir -p "$build/guest"
images/guest/build-initramfs.sh "$agent_bin" "$build/kernel" "$build/guest/initramfs.img"
ln -f "$build/kernel/vmlinux" "$build/guest/vmlinux"

# --- test images -----------------------------------------------------------------
step "images: busybox, python (images/recipes)"
mkdir -p "$build/images"
images/recipes/busybox/build.sh "$build/images/busybox" "$target/release/somna-mkimage"
images/recipes/python/build.sh "$build/images/python" "$target/release/somna-mkimage"

# --- Python SDK (sdk/python) and its test tools, in a venv ----------------------
# The venv lives in the target dir so worktrees sharing build/ do not share it.
pyvenv="$target/python-venv"
step "Python SDK (venv $pyvenv)"
[ -x "$pyvenv/bin/python" ] || python3 -m venv "$pyvenv"
if ! "$pyvenv/bin/python" -c 'import grpc, grpc_tools, pytest, pytest_asyncio, setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
  "$pyvenv/bin/pip" install -q --disable-pip-version-check \
    "setuptools>=77" wheel "grpcio>=1.66" "grpcio-tools>=1.66" "pytest>=8" "pytest-asyncio>=0.23"
fi
# Rebuilt every time (a few seconds): the stubs come from proto/ at build time.
"$pyvenv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./sdk/python

case "$mode" in
  build)
    step "built: $target/release/somna, $build/guest, $build/images"
    ;;
  test)
    step "cargo test --release --workspace"
    export SOMNA_TEST_GUEST_DIR="$build/guest" SOMNA_TEST_IMAGE_DIR="$build/images"
    cargo test --release --locked --workspace
    step "pytest sdk/python/tests (Python SDK against a real somna up)"
    SOMNA_BIN="$target/release/somna" "$pyvenv/bin/python" -m pytest -q -p no:cacheprovider sdk/python/tests
    ;;
  up)
    step "install: /usr/local/bin/somna, /usr/local/lib/somna/guest, /var/lib/somna/oci"
    install -D -m 0755 "$target/release/somna" /usr/local/bin/somna
    install -D -m 0644 "$build/guest/vmlinux" /usr/local/lib/somna/guest/vmlinux
    install -D -m 0644 "$build/guest/initramfs.img" /usr/local/lib/somna/guest/initramfs.img
    for img in busybox python; do
      dst=/var/lib/somna/oci/$img
      if ! cmp -s "$build/images/$img/index.json" "$dst/index.json" 2>/dev/null; then
        mkdir -p /var/lib/somna/oci
        rm -rf "$dst.new" && cp -a "$build/images/$img" "$dst.new"
        rm -rf "$dst" && mv "$dst.new" "$dst"
      fi
    done
    step "somna up"
    exec /usr/local/bin/somna up
    ;;
esac
