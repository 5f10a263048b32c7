#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64) from the archive and
# lays out what the guest needs:
#   OUT/vmlinux              ELF kernel, extracted from vmlinuz (PVH boot)
#   OUT/modules/*.ko         the modules the guest loads from its initramfs
#   OUT/modules/load-order   their file names in dependency order
#   OUT/kernel-package       the package name and version this came from
# The kernel is not installed on the host. Idempotent: does nothing when OUT
# already holds the current package's files.
set -euo pipefail

out=${1:?usage: fetch-kernel.sh OUT_DIR}
mkdir -p "$out"

# Modules the guest needs (dependencies are added automatically):
# virtio transports (mmio for QEMU microvm, pci for Cloud Hypervisor/q35),
# block, console (virtio-serial channel), net, vsock, overlayfs, entropy.
wanted=(virtio_mmio virtio_pci virtio_blk virtio_console virtio_net
        vmw_vsock_virtio_transport overlay virtio_rng)

pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
      awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve linux-image-cloud-amd64; run apt-get update" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
stamp="$pkg $ver $(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/kernel-package" ] && [ "$(cat "$out/kernel-package")" = "$stamp" ] &&
   [ -s "$out/vmlinux" ] && [ -s "$out/modules/load-order" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
  (cd "$work" && apt-get download "$pkg")
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
release=${pkg#linux-image-}
vmlinuz="$work/root/boot/vmlinuz-$release"
moddir="$work/root/lib/modules/$release"

# bzImage: setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c
# (offset relative to the protected-mode code, which starts after the setup
# sectors). The payload is the compressed ELF vmlinux.
u8()  { od -An -tu1 -j "$1" -N1 "$vmlinuz" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$vmlinuz" | tr -d ' '; }
setup_sects=$(u8 $((0x1f1))); if [ "$setup_sects" -eq 0 ]; then setup_sects=4; fi
poff=$(u32 $((0x248))); plen=$(u32 $((0x24c)))
start=$(( (setup_sects + 1) * 512 + poff ))
dd if="$vmlinuz" of="$work/payload" iflag=skip_bytes,count_bytes skip="$start" count="$plen" bs=1M status=none
magic=$(od -An -tx1 -N4 "$work/payload" | tr -d ' ')
case "$magic" in
  02214c18) lz4 -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  1f8b*)    gzip -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  28b52ffd) zstd -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  fd377a58) xz -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  *) echo "fetch-kernel: unknown kernel payload compression (magic $magic)" >&2; exit 1 ;;
esac
# Decompressors may complain about trailing bytes after the stream; what
# matters is that the result is an ELF image.
[ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
  { echo "fetch-kernel: extracted kernel is not an ELF file" >&2; exit 1; }

# Resolve module dependencies depth-first so each module follows its deps.
declare -A seen=()
order=()
modpath() { find "$moddir/kernel" \( -name "$1.ko" -o -name "${1//_/-}.ko" \) -print -quit; }
visit() {
  local name=$1 path deps d
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  path=$(modpath "$name")
  [ -n "$path" ] || { echo "fetch-kernel: module $name not found in $pkg" >&2; exit 1; }
  deps=$(modinfo -F depends "$path")
  for d in ${deps//,/ }; do visit "$d"; done
  order+=("$path")
}
for m in "${wanted[@]}"; do visit "$m"; done

rm -rf "$out/modules" && mkdir -p "$out/modules"
: > "$out/modules/load-order"
for p in "${order[@]}"; do
  cp "$p" "$out/modules/"
  basename "$p" >> "$out/modules/load-order"
done
mv "$work/vmlinux" "$out/vmlinux"
echo "$release" > "$out/kernel-release"
echo "$stamp" > "$out/kernel-package"
echo "fetch-kernel: $pkg $ver -> $out ($(wc -l < "$out/modules/load-order") modules)"
