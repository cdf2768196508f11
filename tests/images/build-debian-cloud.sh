#!/usr/bin/env bash
# Builds a stock Debian 12 (bookworm) cloud image for the test bed, from
# Debian's packages and as close as practical to Debian's own "genericcloud"
# image: a 2 GiB GPT disk (BIOS boot partition + ext4 root), grub-pc in the
# MBR and the BIOS boot partition (it boots by itself under SeaBIOS),
# linux-image-cloud-amd64, systemd, cloud-init with Debian's default
# datasource list, netplan.io + systemd-networkd, openssh-server and sudo.
# Nothing of kiln is in it.
#
# Usage: build-debian-cloud.sh CACHE_DIR   (as root: it uses a loop device)
# Prints the absolute path of CACHE_DIR/debian12-<hash>/disk.qcow2 as the last
# line of stdout; everything else goes to stderr. See README.md.
set -euo pipefail
umask 022

readonly disk_size=2G suite=bookworm
# The mirrors of the host's apt lists (the only ones this machine reaches).
readonly mirrors=(
    "deb http://deb.debian.org/debian $suite main"
    "deb http://deb.debian.org/debian $suite-updates main"
    "deb http://deb.debian.org/debian-security $suite-security main"
)
# Pinned to the candidates of the host's apt lists and part of the cache key.
readonly key_packages=(linux-image-cloud-amd64 cloud-init grub-pc systemd openssh-server netplan.io)
# The rest of genericcloud's list that costs little (minbase is the base, as
# Debian's debootstrap --variant minbase; Recommends are not installed).
# Left out: apparmor (the kernel's Recommends): every first boot compiles its
# profiles, about 40 s under TCG, and each test VM boots an image first.
readonly other_packages=(
    systemd-sysv libpam-systemd dbus systemd-resolved polkitd chrony
    cloud-guest-utils cloud-initramfs-growroot ssh-import-id sudo
    ca-certificates curl wget zstd unattended-upgrades
    apt-utils iproute2 iputils-ping netbase less nano vim-tiny whiptail logrotate
)

log() { printf 'build-debian-cloud: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# 1. Arguments and inputs.
started=$SECONDS
[[ $# -eq 1 ]] || die "usage: $0 CACHE_DIR"
mkdir -p "$1"
cache=$(cd "$1" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
recipe="$here/$(basename "${BASH_SOURCE[0]}")"

# 2. Pin the exact versions of the key packages from the local apt lists
#    (one apt-cache call: each one reads all the lists).
declare -A version=()
candidates() { # PACKAGE...: fills version[]; dies on one that has no candidate
    local p v
    while read -r p v; do version[$p]=$v; done < <(apt-cache policy "$@" |
        awk '/^[^ ]/ { sub(/:$/, ""); p = $0 } /^ *Candidate:/ { print p, $2 }')
    for p in "$@"; do
        v=${version[$p]:-}
        [[ -n $v && $v != "(none)" ]] ||
            die "no installable version of $p in the apt lists (run apt-get update)"
    done
}
candidates "${key_packages[@]}"
kernel_pkg=$(apt-cache depends "linux-image-cloud-amd64=${version[linux-image-cloud-amd64]}" |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
[[ -n $kernel_pkg ]] ||
    die "cannot tell which kernel linux-image-cloud-amd64 ${version[linux-image-cloud-amd64]} depends on"
candidates "$kernel_pkg"
pinned=("$kernel_pkg" "${key_packages[@]}")

# 3. Hash the recipe and the pinned versions; a finished image is reused as is.
hash=$({
    printf 'recipe %s\n' "$(sha256sum <"$recipe")"
    for p in "${pinned[@]}"; do printf '%s %s\n' "$p" "${version[$p]}"; done
} | sha256sum | cut -c1-16)
final="$cache/debian12-$hash"
if [[ -f $final/disk.qcow2 ]]; then
    log "cached: $final"
    printf '%s\n' "$final/disk.qcow2"
    exit 0
fi
log "building $final ($kernel_pkg ${version[$kernel_pkg]}, cloud-init ${version[cloud-init]})"

# 4. Root and the host tools (scripts/install-deps installs them).
[[ $(id -u) -eq 0 ]] || die "must run as root (loop device, mount, chroot)"
for tool in mmdebstrap sgdisk mkfs.ext4 partx losetup qemu-img fstrim; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps"
done

# 5. Work in a temporary dir next to the result; on any exit, unmount what is
#    mounted below it, detach the loop device and remove it.
work=$(mktemp -d "$cache/.build-debian12.XXXXXX")
mnt="$work/root" raw="$work/disk.raw" out="$work/out" loop=
cleanup() {
    local rc=$?
    if mountpoint -q "$mnt"; then umount -R "$mnt" || umount -R -l "$mnt" || true; fi
    if [[ -n $loop ]]; then
        partx -d "$loop" 2>/dev/null || true
        losetup -d "$loop" || true
    fi
    rm -rf "$work"
    [[ $rc -eq 0 ]] || log "failed (exit $rc); nothing was published"
}
trap cleanup EXIT
mkdir -p "$mnt" "$out"

# 6. The disk, laid out like Debian's (without the EFI system partition):
#    p14 BIOS boot at sector 2048 (3 MiB, where grub puts core.img), p1 the
#    ext4 root over the rest. The kernel does not scan loop partition tables
#    here: partx adds the partitions.
truncate -s "$disk_size" "$raw"
sgdisk -n 14:2048:8191 -t 14:ef02 -c 14:bios -n 1:8192:0 -t 1:8300 -c 1:root "$raw" >/dev/null
loop=$(losetup --find --show "$raw")
partx -a "$loop"
for _ in $(seq 50); do
    [[ -b ${loop}p1 && -b ${loop}p14 ]] && break
    sleep 0.1
done
[[ -b ${loop}p1 ]] || die "no ${loop}p1 after partx -a"
root_uuid=$(cat /proc/sys/kernel/random/uuid)
mkfs.ext4 -q -U "$root_uuid" -L root "${loop}p1"
tune2fs -c 0 -i 0 "${loop}p1" >/dev/null
mount "${loop}p1" "$mnt"

# 7. The root file system: minbase plus the packages, from Debian's mirrors.
#    mmdebstrap empties /etc/machine-id, removes the apt lists and the package
#    cache when it ends. dpkg does not fsync while it builds the image (the
#    trim and unmount below flush it); that option is not left in the image.
include=()
for p in "${pinned[@]}"; do include+=("$p=${version[$p]}"); done
include+=("${other_packages[@]}")
log "mmdebstrap: ${include[*]}"
# shellcheck disable=SC2016 # the hooks' "$1" is mmdebstrap's, not ours
mmdebstrap --mode=root --variant=minbase --format=directory --dpkgopt=force-unsafe-io \
    --include="$(IFS=,; printf '%s' "${include[*]}")" \
    --essential-hook='echo "grub-pc grub-pc/install_devices multiselect" | chroot "$1" debconf-set-selections' \
    --essential-hook='echo "grub-pc grub-pc/install_devices_empty boolean true" | chroot "$1" debconf-set-selections' \
    "$suite" "$mnt" "${mirrors[@]}" >&2
rm -f "$mnt/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
log "mmdebstrap done after $((SECONDS - started)) s"

# 8. Configuration, as Debian's image has it.
# fstab by UUID; the options are Debian's.
printf '# /etc/fstab: static file system information\nUUID=%s / ext4 %s 0 1\n' \
    "$root_uuid" rw,discard,errors=remount-ro,x-systemd.growfs >"$mnt/etc/fstab"
# /etc/default/grub as grub-cloud-amd64 ships it (Debian's kernel command
# line and a serial terminal), and no menu timeout.
cat >"$mnt/etc/default/grub" <<'EOF'
# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.
# For full documentation of the options in this file, see:
#   info -f grub -n 'Simple configuration'

GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
EOF
mkdir -p "$mnt/etc/default/grub.d"
echo 'GRUB_TIMEOUT=0' >"$mnt/etc/default/grub.d/15_timeout.cfg"
# Host identity: none. mmdebstrap copied the build host's name and resolver.
echo localhost >"$mnt/etc/hostname"
printf '%s\n' '127.0.0.1	localhost' '::1		localhost ip6-localhost ip6-loopback' \
    'ff02::1		ip6-allnodes' 'ff02::2		ip6-allrouters' >"$mnt/etc/hosts"
ln -sfn /run/systemd/resolve/resolv.conf "$mnt/etc/resolv.conf"
rm -f "$mnt/etc/mailname"
# Debian's locale (cloud-init's locale module keeps it; without it, it tries
# en_US.UTF-8, which is not generated, and fails).
echo 'LANG=C.UTF-8' >"$mnt/etc/default/locale"
# cloud-init: Debian's genericcloud drop-in (its datasource list is untouched).
printf 'manage_etc_hosts: true\n' >"$mnt/etc/cloud/cloud.cfg.d/01_debian_cloud.cfg"
# sshd as Debian's image configures it.
sed -i -e 's/^#PasswordAuthentication yes/PasswordAuthentication no/' \
    -e 's/^PermitRootLogin .*/PermitRootLogin without-password/' "$mnt/etc/ssh/sshd_config"
echo 'ClientAliveInterval 120' >>"$mnt/etc/ssh/sshd_config"
printf 'blacklist pcspkr\nblacklist floppy\n' >"$mnt/etc/modprobe.d/blacklist.conf"
# Network: netplan (its generator writes networkd units from what cloud-init
# renders), systemd-networkd and systemd-resolved.
chroot "$mnt" systemctl enable systemd-networkd.service systemd-resolved.service >&2

# 9. The boot loader, from inside the image: grub-install (i386-pc: boot.img
#    in the MBR, core.img in the BIOS boot partition) and update-grub. They run
#    with a private /dev holding only the loop device, its partitions and the
#    /dev/disk/by-uuid link udev would make (there is no udev here, and without
#    that link grub-mkconfig writes root=/dev/loopNp1).
mount -t tmpfs -o mode=0755 tmpfs "$mnt/dev"
cp -a /dev/null /dev/zero /dev/full /dev/random /dev/urandom "$loop" "${loop}p1" "${loop}p14" "$mnt/dev/"
mkdir -p "$mnt/dev/disk/by-uuid"
ln -s "../../$(basename "${loop}p1")" "$mnt/dev/disk/by-uuid/$root_uuid"
mount -t proc proc "$mnt/proc"
mount -t sysfs sysfs "$mnt/sys"
chroot "$mnt" grub-install --target=i386-pc "$loop" >&2
chroot "$mnt" update-grub >&2
grep -q "root=UUID=$root_uuid" "$mnt/boot/grub/grub.cfg" || die "grub.cfg does not boot root=UUID=$root_uuid"
umount "$mnt/sys" "$mnt/proc" "$mnt/dev"

# 10. What makes one instance differ from another: none of it in the image.
rm -f "$mnt"/etc/ssh/ssh_host_*
: >"$mnt/etc/machine-id"
rm -f "$mnt/var/lib/dbus/machine-id"
rm -rf "${mnt:?}"/var/lib/cloud "$mnt"/var/lib/chrony/*
find "$mnt/var/log" -type f -not -empty -delete
# shellcheck disable=SC2016 # a dpkg-query format, not an expansion
chroot "$mnt" dpkg-query -W -f '${Package} ${Version}\n' >"$out/packages.txt"

# 11. Trim (the loop device punches holes in the raw file, so the deleted
#     package cache and host keys leave no data), unmount, detach, convert.
#     Sync first: blocks freed in a journal transaction that has not been
#     committed are not free yet, and the trim would skip them.
sync -f "$mnt"
fstrim "$mnt"
umount "$mnt"
partx -d "$loop"
losetup -d "$loop"
loop=
qemu-img convert -O qcow2 "$raw" "$out/disk.qcow2"

# 12. What went in.
{
    printf 'name debian12-%s\nrecipe %s\nsuite %s\n' "$hash" "$(sha256sum <"$recipe" | cut -d' ' -f1)" "$suite"
    printf 'mirror %s\n' "${mirrors[@]}"
    for p in "${pinned[@]}"; do printf 'pinned %s %s\n' "$p" "${version[$p]}"; done
    printf 'package %s\n' "${other_packages[@]}"
    printf 'root UUID=%s\nbuilt %s in %s s\n' "$root_uuid" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$((SECONDS - started))"
} >"$out/inputs.txt"

# 13. Publish atomically; if a concurrent build won the race, use its result.
if ! mv -T "$out" "$final" 2>/dev/null; then
    [[ -f $final/disk.qcow2 ]] || die "cannot move the image to $final"
fi
log "done in $((SECONDS - started)) s: $(du -sh "$final/disk.qcow2" | cut -f1) in $final"
printf '%s\n' "$final/disk.qcow2"
