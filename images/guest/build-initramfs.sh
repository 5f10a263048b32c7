#!/usr/bin/env bash
# Assembles the guest initramfs (uncompressed newc cpio):
#   /init                  the static guest agent (PID 1)
#   /lib/modules/*.ko      kernel modules, with /lib/modules/load-order
#   /dev/console           so PID 1 starts with the console as stdio
# Usage: build-initramfs.sh GUEST_AGENT_BIN KERNEL_DIR OUT_FILE
# (KERNEL_DIR is the output of fetch-kernel.sh). Idempotent: rebuilds only
# when an input changed.
set -euo pipefail

agent=${1:?usage: build-initramfs.sh GUEST_AGENT_BIN KERNEL_DIR OUT_FILE}
kdir=${2:?usage: build-initramfs.sh GUEST_AGENT_BIN KERNEL_DIR OUT_FILE}
out=${3:?usage: build-initramfs.sh GUEST_AGENT_BIN KERNEL_DIR OUT_FILE}

file "$agent" 2>/dev/null | grep -q 'static' || {
  command -v file >/dev/null && { echo "build-initramfs: $agent is not statically linked" >&2; exit 1; }
}
inputs=$(cat "$agent" "$kdir"/modules/* "$0" | sha256sum | cut -c1-32)
if [ -f "$out" ] && [ -f "$out.inputs" ] && [ "$(cat "$out.inputs")" = "$inputs" ]; then
  exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,lib/modules,sysroot,.somna}
install -m 0755 "$agent" "$stage/init"
cp "$kdir"/modules/*.ko "$kdir"/modules/load-order "$stage/lib/modules/"
mknod -m 0600 "$stage/dev/console" c 5 1
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$inputs" > "$out.inputs"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1))"
