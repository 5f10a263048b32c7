#!/usr/bin/env bash
# Builds the `python:latest` test image: a minimal Debian bookworm root
# (mmdebstrap's `essential` variant, merged /usr) with `python3` (the full
# standard library), an unprivileged `user` (uid/gid 1000), no apt lists,
# caches, docs, man pages or locales.
#
#   build.sh OUT_LAYOUT_DIR MKIMAGE_BIN
#
# OUT_LAYOUT_DIR is the OCI image layout to write; the image store finds it
# when it is <local_dir>/python. MKIMAGE_BIN is somna-mkimage
# (cargo build -p somna-images --bin somna-mkimage). Needs root, apt and
# the Debian archive (MIRROR, default http://deb.debian.org/debian).
#
# Idempotent: when OUT_LAYOUT_DIR holds an image built by this same script
# for the same python3 version, it does nothing. Delete OUT_LAYOUT_DIR to
# force a rebuild.
set -euo pipefail

die() { echo "python recipe: $*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: $0 OUT_LAYOUT_DIR MKIMAGE_BIN"
out=$1
mkimage=$2
suite=bookworm
mirror=${MIRROR:-http://deb.debian.org/debian}
[[ -x $mkimage ]] || die "$mkimage is not executable (build it: cargo build -p somna-images --bin somna-mkimage)"
[[ $(id -u) -eq 0 ]] || die "run as root (mmdebstrap --mode=root, files owned by other users)"
command -v apt-get >/dev/null || die "apt-get not found (this recipe uses Debian's packages)"

if ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null \
        || die "cannot install mmdebstrap"
fi

candidate() { apt-cache policy python3 2>/dev/null | awk '/Candidate:/ {print $2}'; }
version=$(candidate)
if [[ -z $version || $version == "(none)" ]]; then
    apt-get update -qq || true
    version=$(candidate)
fi
[[ -n $version && $version != "(none)" ]] || die "apt knows no python3 package (check apt's sources)"

self=$(readlink -f "${BASH_SOURCE[0]}")
stamp="recipe=$(sha256sum "$self" | cut -d' ' -f1) python3=$version suite=$suite"
stamp_file=$out/.somna-recipe-stamp
if [[ -f $out/index.json && -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
    echo "python: up to date in $out (python3 $version)"
    exit 0
fi

SECONDS=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

if ! mmdebstrap --mode=root --variant=essential \
    --include=python3,usr-is-merged \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    "$suite" "$root" "$mirror" >"$work/mmdebstrap.log" 2>&1; then
    tail -n 30 "$work/mmdebstrap.log" >&2
    die "mmdebstrap failed"
fi
bootstrap_s=$SECONDS

# No apt metadata, caches or logs in the image.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/var/lib/dpkg/*-old "$root"/var/log/* "$root"/etc/machine-id "$root"/etc/hostname
mkdir -p "$root/var/lib/apt/lists/partial"

# The unprivileged user.
if grep -q '^[^:]*:[^:]*:1000:' "$root/etc/passwd"; then
    die "uid 1000 is already taken in the bootstrap"
fi
echo 'user:x:1000:1000:user:/home/user:/bin/bash' >> "$root/etc/passwd"
echo 'user:x:1000:' >> "$root/etc/group"
if [[ -f $root/etc/shadow ]]; then echo 'user:*:19000:0:99999:7:::' >> "$root/etc/shadow"; fi
if [[ -f $root/etc/gshadow ]]; then echo 'user:*::' >> "$root/etc/gshadow"; fi
mkdir -p "$root/home/user"
chown 1000:1000 "$root/home/user"
chmod 0755 "$root/home/user"

got=$(chroot "$root" python3 -c 'print(2**100)') || die "python3 does not run in the bootstrap"
[[ $got == 1267650600228229401496703205376 ]] || die "python3 printed $got"

"$mkimage" --rootfs "$root" --layout "$out" --tag python:latest \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3
printf '%s\n' "$stamp" > "$stamp_file"
echo "python: built in ${SECONDS}s (bootstrap ${bootstrap_s}s): python3 $version, rootfs $(du -sh --apparent-size "$root" | cut -f1), layout $(du -sh "$out" | cut -f1) in $out"
