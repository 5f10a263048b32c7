#!/usr/bin/env bash
# Builds the `busybox:latest` test image from Debian's busybox-static
# package: /bin/busybox, a symlink for each of its applets, root, nobody and
# an unprivileged `user` (uid/gid 1000).
#
#   build.sh OUT_LAYOUT_DIR MKIMAGE_BIN
#
# OUT_LAYOUT_DIR is the OCI image layout to write; the image store finds it
# when it is <local_dir>/busybox. MKIMAGE_BIN is somna-mkimage
# (cargo build -p somna-images --bin somna-mkimage). Needs root and apt.
#
# Idempotent: when OUT_LAYOUT_DIR holds an image built by this same script
# from the same package version, it does nothing. Delete OUT_LAYOUT_DIR to
# force a rebuild.
set -euo pipefail

die() { echo "busybox recipe: $*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: $0 OUT_LAYOUT_DIR MKIMAGE_BIN"
out=$1
mkimage=$2
[[ -x $mkimage ]] || die "$mkimage is not executable (build it: cargo build -p somna-images --bin somna-mkimage)"
[[ $(id -u) -eq 0 ]] || die "run as root (the image holds files owned by other users)"
command -v apt-get >/dev/null || die "apt-get not found (this recipe uses Debian's packages)"

pkg=busybox-static
candidate() { apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
version=$(candidate)
if [[ -z $version || $version == "(none)" ]]; then
    apt-get update -qq || true
    version=$(candidate)
fi
[[ -n $version && $version != "(none)" ]] || die "apt knows no $pkg package (check apt's sources)"

self=$(readlink -f "${BASH_SOURCE[0]}")
stamp="recipe=$(sha256sum "$self" | cut -d' ' -f1) $pkg=$version"
stamp_file=$out/.somna-recipe-stamp
if [[ -f $out/index.json && -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
    echo "busybox: up to date in $out ($pkg $version)"
    exit 0
fi

SECONDS=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$version") \
    || die "apt-get download $pkg=$version failed"
dpkg-deb -x "$work"/"${pkg}"_*.deb "$work/deb"
[[ -x $work/deb/bin/busybox ]] || die "the $pkg package has no /bin/busybox"

root=$work/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,var/tmp,root,home/user}
install -m 0755 "$work/deb/bin/busybox" "$root/bin/busybox"
applets=0
while read -r applet; do
    [[ -n $applet ]] || continue
    [[ -e $root/$applet || -L $root/$applet ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
    applets=$((applets + 1))
done < <("$root/bin/busybox" --list-full)
[[ -L $root/bin/sh ]] || die "busybox has no sh applet"

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
user:x:1000:
nogroup:x:65534:
GROUP
cat > "$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
HOSTS
chmod 0644 "$root"/etc/{passwd,group,hosts}
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
chown 1000:1000 "$root/home/user"
chmod 0755 "$root/home/user"

# Same package, same bytes: every mtime is the busybox binary's.
epoch=$(stat -c %Y "$work/deb/bin/busybox")
find "$root" -exec touch -h -d "@$epoch" {} +

"$mkimage" --rootfs "$root" --layout "$out" --tag busybox:latest \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd sh
printf '%s\n' "$stamp" > "$stamp_file"
echo "busybox: built in ${SECONDS}s: $pkg $version, $applets applets, layout $(du -sh "$out" | cut -f1) in $out"
