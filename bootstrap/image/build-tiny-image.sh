#!/usr/bin/env bash
# Builds kiln-tiny, kiln's own minimal base VM image: a Debian kernel, an
# initramfs that loads the virtio/ext4/vfat/iso9660 modules, and an ext4 root holding only
# busybox-static, a few config files and kiln's boot hook.
#
# Usage: build-tiny-image.sh CACHE_DIR
# Prints the absolute path of CACHE_DIR/tiny-<hash>/image.json as the last
# line of stdout; everything else goes to stderr. See README.md.
set -euo pipefail
umask 022

readonly root_size=256M
# Modules the guest needs, resolved to a load order with modules.dep below.
# The root has no modules, so everything is loaded here, before switch_root.
# crc32c_generic: ext4 and jbd2 only soft-depend on "crypto-crc32c" (needed for
# metadata_csum); crc32c-intel needs SSE4.2, which TCG's default CPU lacks.
# vfat (and fat): the NoCloud "cidata" drive holding the user-data. A vfat
# mount without options loads the kernel's default codepage and iocharset,
# CONFIG_FAT_DEFAULT_CODEPAGE=437 and CONFIG_FAT_DEFAULT_IOCHARSET="ascii",
# both =m in Debian's kernel: nls_cp437 and nls_ascii. (CONFIG_NLS_DEFAULT is
# "utf8", but nothing here needs nls_utf8: vfat's utf8 option, the default,
# uses the built-in UTF-8 code, and load_nls_default falls back to a built-in
# table.) isofs: cidata drives made as ISO 9660 (cloud-localds, genisoimage).
readonly wanted_modules=(virtio_pci virtio_blk crc32c_generic ext4 virtio_net
    nls_cp437 nls_ascii vfat isofs)

log() { printf 'build-tiny-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# 1. Arguments and inputs.
[[ $# -eq 1 ]] || die "usage: $0 CACHE_DIR"
mkdir -p "$1"
cache=$(cd "$1" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
recipe="$here/$(basename "${BASH_SOURCE[0]}")"
hook=${KILN_BOOT_HOOK:-$here/../boot-hook/kiln-boot-hook}
[[ -f $hook ]] || die "boot hook not found: $hook (set KILN_BOOT_HOOK to override)"
hook_init="$hook.init"

# 2. Pin the exact Debian package versions from the local apt lists.
candidate() {
    local v
    v=$(apt-cache policy "$1" | sed -n 's/^ *Candidate: //p')
    [[ -n $v && $v != "(none)" ]] || die "no installable version of $1 in the apt lists"
    printf '%s\n' "$v"
}
meta_ver=$(candidate linux-image-amd64)
kernel_pkg=$(apt-cache depends "linux-image-amd64=$meta_ver" |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
[[ -n $kernel_pkg ]] || die "cannot tell which kernel linux-image-amd64 $meta_ver depends on"
kernel_ver=$(candidate "$kernel_pkg")
busybox_ver=$(candidate busybox-static)

# 3. Hash every input; a finished image with this hash is reused as is.
hash=$({
    printf 'recipe %s\n' "$(sha256sum <"$recipe")"
    printf 'hook %s\n' "$(sha256sum <"$hook")"
    if [[ -f $hook_init ]]; then printf 'hook.init %s\n' "$(sha256sum <"$hook_init")"; fi
    printf '%s %s\n' "$kernel_pkg" "$kernel_ver" busybox-static "$busybox_ver"
} | sha256sum | cut -c1-16)
final="$cache/tiny-$hash"
if [[ -f $final/image.json ]]; then
    log "cached: $final"
    printf '%s\n' "$final/image.json"
    exit 0
fi
log "building $final ($kernel_pkg $kernel_ver, busybox-static $busybox_ver)"

# 4. Work in a temporary dir next to the result; it is removed on any exit.
work=$(mktemp -d "$cache/.build-tiny.XXXXXX")
cleanup() {
    local rc=$?
    rm -rf "$work"
    [[ $rc -eq 0 ]] || log "failed (exit $rc); nothing was published"
}
trap cleanup EXIT
out="$work/out" initrd="$work/initrd" rootfs="$work/rootfs"
mkdir -p "$out" "$initrd" "$rootfs" "$cache/debs"

# 5. Download the two packages once into CACHE_DIR/debs (atomically).
deb_path() { printf '%s/debs/%s_%s_amd64.deb\n' "$cache" "$1" "${2//:/%3a}"; }
fetch_deb() {
    local deb
    deb=$(deb_path "$1" "$2")
    [[ -f $deb ]] && return 0
    mkdir -p "$work/dl"
    (cd "$work/dl" && apt-get download "$1=$2" >&2)
    mv "$work/dl/$(basename "$deb")" "$deb"
}
fetch_deb "$kernel_pkg" "$kernel_ver"
fetch_deb busybox-static "$busybox_ver"

# 6. Unpack them (no root needed) and find the kernel and its modules.
dpkg-deb -x "$(deb_path "$kernel_pkg" "$kernel_ver")" "$work/kernel"
dpkg-deb -x "$(deb_path busybox-static "$busybox_ver")" "$work/busybox"
busybox="$work/busybox/bin/busybox"
moddir=
for d in "$work"/kernel/lib/modules/* "$work"/kernel/usr/lib/modules/*; do
    if [[ -d $d ]]; then moddir=$d; break; fi
done
[[ -n $moddir ]] || die "no modules directory in $kernel_pkg"
kver=$(basename "$moddir")
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"

# 7. The .deb ships no modules.dep (depmod makes it at install): make it with
#    busybox depmod, then order the wanted modules after their dependencies.
"$busybox" depmod -b "$work/kernel" "$kver"
[[ -f $moddir/modules.dep ]] || die "depmod wrote no modules.dep"
declare -A seen=()
ordered=()
add_module() { # PATH relative to $moddir, as in modules.dep
    local dep deps=()
    [[ -n ${seen[$1]:-} ]] && return 0
    seen[$1]=1
    read -ra deps < <(awk -v m="$1:" '$1 == m { $1 = ""; print; exit }' "$moddir/modules.dep") || true
    for dep in "${deps[@]}"; do
        add_module "$dep"
    done
    ordered+=("$1")
}
module_name() { local n=${1##*/}; n=${n%%.ko*}; printf '%s\n' "${n//-/_}"; }
for want in "${wanted_modules[@]}"; do
    path=$(awk -F: -v n="$want" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko.*$/, "", f); gsub(/-/, "_", f)
        if (f == n) { print $1; exit } }' "$moddir/modules.dep")
    [[ -n $path ]] || die "module $want is not in $kernel_pkg"
    add_module "$path"
done

# 8. Copy them into the initramfs uncompressed (busybox insmod needs plain .ko).
mkdir -p "$initrd/lib/modules"
names=()
for path in "${ordered[@]}"; do
    name=$(module_name "$path")
    case $path in
        *.ko.xz) xz -dc "$moddir/$path" ;;
        *.ko.zst) zstd -dc "$moddir/$path" ;;
        *.ko.gz) gzip -dc "$moddir/$path" ;;
        *) cat "$moddir/$path" ;;
    esac >"$initrd/lib/modules/$name.ko"
    names+=("$name")
done
log "modules: ${names[*]}"

# install_busybox DIR: busybox plus a symlink for every applet (as on the host list).
install_busybox() {
    local applet
    mkdir -p "$1/bin"
    cp "$busybox" "$1/bin/busybox"
    for applet in $("$busybox" --list-full); do
        [[ $applet == */* && $applet != bin/busybox ]] || continue
        mkdir -p "$1/$(dirname "$applet")"
        ln -sf /bin/busybox "$1/$applet"
    done
}

# 9. The initramfs: busybox and an /init that mounts /dev/vda and switches to it.
install_busybox "$initrd"
mkdir -p "$initrd/proc" "$initrd/sys" "$initrd/dev" "$initrd/newroot"
{
    printf '#!/bin/sh\n# kiln-tiny initramfs (generated by build-tiny-image.sh)\n'
    printf 'modules="%s"\n' "${names[*]}"
    cat <<'EOF'
export PATH=/sbin:/usr/sbin:/bin:/usr/bin

# Nothing can be fixed from here: say why on the console and power off.
fail() {
    echo "kiln-tiny initramfs: $*; powering off" >/dev/console
    poweroff -f
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
exec </dev/console >/dev/console 2>&1

# Load the modules in dependency order (resolved at build time).
for m in $modules; do
    insmod "/lib/modules/$m.ko" || fail "cannot load module $m"
done

# Wait up to 5 s for the root disk, then mount it read-write.
tries=50
while [ ! -b /dev/vda ]; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || fail "no /dev/vda after 5 s"
    sleep 0.1
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda (ext4)"
[ -x /newroot/sbin/init ] || fail "/dev/vda has no /sbin/init"

# Hand /dev, /proc and /sys over to the real root and start its init.
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs"
done
exec switch_root /newroot /sbin/init
EOF
} >"$initrd/init"
chmod 755 "$initrd/init"

# 10. Pack it: newc cpio in sorted order, fixed owner and mtimes, gzip -n.
find "$initrd" -exec touch -h -d @0 {} +
(cd "$initrd" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$out/initrd.img"

# 11. The root filesystem staging tree: busybox, config, the boot hook.
install_busybox "$rootfs"
mkdir -p "$rootfs"/{proc,sys,dev,run,tmp,root,var/lib,mnt,etc/init.d,usr/lib/kiln}
chmod 1777 "$rootfs/tmp"
chmod 700 "$rootfs/root"
ln -sf /proc/self/mounts "$rootfs/etc/mtab"
echo kiln-tiny >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost kiln-tiny\n' >"$rootfs/etc/hosts"
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
    >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$rootfs/etc/group"
install -m 755 "$hook" "$rootfs/usr/lib/kiln/kiln-boot-hook"
if [[ -f $hook_init ]]; then install -m 755 "$hook_init" "$rootfs/etc/init.d/kiln-boot-hook"; fi

# busybox init: start-up script, then the boot hook once, with its output on the console.
cat >"$rootfs/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::once:/bin/sh -c '/usr/lib/kiln/kiln-boot-hook >/dev/console 2>&1'
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/sync
::shutdown:/bin/mount -o remount,ro /
EOF

# rcS: file systems, hostname, network by DHCP (bounded: at most 10 tries).
cat >"$rootfs/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# kiln-tiny start-up, run once by busybox init.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
# The initramfs moves /proc, /sys and /dev here; mount them if it did not.
[ -e /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -o remount,rw /
hostname -F /etc/hostname
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 || echo "rcS: no DHCP lease on eth0"
else
    echo "rcS: no eth0"
fi
EOF

# udhcpc event script: address, default route, MTU and resolv.conf from the lease.
cat >"$rootfs/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc calls this with deconfig|bound|renew|leasefail|nak and the lease in the environment.
case $1 in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "${mtu:-}" ]; then ip link set "$interface" mtu "$mtu"; fi
        for r in ${router:-}; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        {
            if [ -n "${domain:-}" ]; then echo "search $domain"; fi
            for d in ${dns:-}; do echo "nameserver $d"; done
        } >/etc/resolv.conf.new && mv /etc/resolv.conf.new /etc/resolv.conf
        echo "udhcpc: $interface $ip/${mask:-24} via ${router:-none}"
        ;;
esac
exit 0
EOF

# busybox 1.35 fstrim has no -a, which kiln's agent uses when it seals: emulate it.
rm -f "$rootfs/sbin/fstrim"
cat >"$rootfs/sbin/fstrim" <<'EOF'
#!/bin/sh
# fstrim -a [-v]: trim every mounted block-device file system; else busybox fstrim.
all=no verbose=
for arg in "$@"; do
    case $arg in
        -a | --all) all=yes ;;
        -v | --verbose) verbose=-v ;;
        -av | -va) all=yes verbose=-v ;;
        *) exec /bin/busybox fstrim "$@" ;;
    esac
done
[ "$all" = yes ] || exec /bin/busybox fstrim "$@"
rc=0
while read -r dev dir _; do
    case $dev in /dev/*) /bin/busybox fstrim $verbose "$dir" || rc=1 ;; esac
done </proc/mounts
exit "$rc"
EOF
chmod 755 "$rootfs/etc/init.d/rcS" "$rootfs/etc/udhcpc.script" "$rootfs/sbin/fstrim"

# 12. Make the ext4 (sparse raw file, owned by root) and convert it to qcow2.
[[ $(id -u) -eq 0 ]] || log "warning: not root: mke2fs -d keeps uid $(id -u) on the files"
truncate -s "$root_size" "$work/root.raw"
mke2fs -q -F -t ext4 -L kiln-root -E root_owner=0:0 -d "$rootfs" "$work/root.raw"
qemu-img convert -O qcow2 "$work/root.raw" "$out/disk.qcow2"

# 13. The manifest (paths relative to it).
printf '{"format":"qcow2","disk":"disk.qcow2","kernel":"vmlinuz","initrd":"initrd.img",%s%s}\n' \
    '"append":"console=ttyS0 root=/dev/vda rw panic=-1","name":"kiln-tiny",' \
    "\"packages\":{\"$kernel_pkg\":\"$kernel_ver\",\"busybox-static\":\"$busybox_ver\"}" \
    >"$out/image.json"

# 14. Publish atomically; if a concurrent build won the race, use its result.
if ! mv -T "$out" "$final" 2>/dev/null; then
    [[ -f $final/image.json ]] || die "cannot move the image to $final"
fi
log "done: $(du -sh --apparent-size "$final" | cut -f1) in $final"
printf '%s\n' "$final/image.json"
