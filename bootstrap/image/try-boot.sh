#!/usr/bin/env bash
# Boots a kiln-tiny image under QEMU (TCG) with its user-data on a NoCloud
# "cidata" drive (vfat, read-only, the second virtio disk) and no way to reach
# the host, and checks that the user-data ran and that its write reached the disk.
#
# Usage: try-boot.sh MANIFEST   (the image.json printed by build-tiny-image.sh)
# Needs qemu-system-x86_64, qemu-img, debugfs, mkfs.vfat (dosfstools) and
# mcopy (mtools).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf 'try-boot: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# 1. Read the manifest; its paths are relative to it.
[[ $# -eq 1 && -f $1 ]] || die "usage: $0 MANIFEST"
dir=$(cd "$(dirname "$1")" && pwd)
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
kernel="$dir/$(field "$1" kernel)"
initrd="$dir/$(field "$1" initrd)"
disk="$dir/$(field "$1" disk)"
append=$(field "$1" append)

# 2. A scratch dir, kept if the boot fails or KILN_TRY_BOOT_KEEP is set.
for tool in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debugfs:e2fsprogs \
    mkfs.vfat:dosfstools mcopy:mtools; do
    command -v "${tool%%:*}" >/dev/null || die "${tool%%:*} is not installed (Debian package ${tool#*:})"
done
work=$(mktemp -d /tmp/kiln-try-boot.XXXXXX)
ok=no
cleanup() {
    if [[ $ok == yes && -z ${KILN_TRY_BOOT_KEEP:-} ]]; then
        rm -rf "$work"
    else
        log "kept $work for inspection"
    fi
}
trap cleanup EXIT

# 3. The NoCloud files: all four, as kiln's local cloud writes them.
mkdir "$work/seed"
cat >"$work/seed/user-data" <<'EOF'
#!/bin/sh
read -r up _ </proc/uptime
echo "KILN-TINY-OK (guest uptime $up s)"; echo proof > /etc/kiln-proof; sync; poweroff -f
EOF
printf 'instance-id: kiln-try-boot\nlocal-hostname: kiln-tiny\n' >"$work/seed/meta-data"
: >"$work/seed/vendor-data"
printf 'version: 2\nethernets: {}\n' >"$work/seed/network-config"

# 4. The cidata drive: a 1 MiB FAT image labelled CIDATA with the files at its root.
mkfs.vfat -n CIDATA -C "$work/cidata.img" 1024 >/dev/null
for f in user-data meta-data vendor-data network-config; do
    MTOOLS_SKIP_CHECK=1 mcopy -i "$work/cidata.img" "$work/seed/$f" "::$f"
done

# 5. A throw-away overlay on the image's disk.
qemu-img create -q -f qcow2 -F qcow2 -b "$disk" "$work/overlay.qcow2"

# 6. Boot: /dev/vda the overlay, /dev/vdb the cidata drive (read-only), and
#    user-mode networking that reaches nothing outside the guest (restrict=on),
#    so the user-data can only come from the drive. The user-data powers off
#    right after printing its mark, so the time until QEMU exits is the
#    boot-to-user-data time.
log "booting (TCG), user-data on a cidata drive, network restricted"
start=$(date +%s%N)
rc=0
timeout 120 qemu-system-x86_64 -accel tcg -machine q35 -m 512 -smp 1 -nodefaults \
    -display none -no-reboot -serial "file:$work/console.log" \
    -kernel "$kernel" -initrd "$initrd" -append "$append" \
    -drive "file=$work/overlay.qcow2,if=virtio,discard=unmap" \
    -drive "file=$work/cidata.img,format=raw,if=virtio,readonly=on" \
    -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0 || rc=$?
took=$((($(date +%s%N) - start) / 10000000))

# 7. Success: QEMU exited by itself (not killed by timeout) and the user-data ran.
[[ $rc -eq 0 ]] || die "QEMU failed or timed out (exit $rc); console: $work/console.log"
grep -q KILN-TINY-OK "$work/console.log" || die "no KILN-TINY-OK on the console: $work/console.log"
grep -q 'kiln-boot-hook: running user-data from cidata ' "$work/console.log" ||
    die "the user-data did not come from the cidata drive: $work/console.log"
grep 'kiln-boot-hook: attempt [0-9]*: cidata: ' "$work/console.log" | tr -d '\r' | sed 's/^/try-boot: guest: /' >&2
ran=$(sed -n 's/.*KILN-TINY-OK (guest uptime \([0-9.]*\) s).*/\1/p' "$work/console.log")
uptime=$(sed -n 's/^\[ *\([0-9.]*\)\] reboot: Power down.*/\1/p' "$work/console.log")
log "boot to user-data and power-off: $((took / 100)).$(printf '%02d' $((took % 100))) s" \
    "(guest clock: user-data ran at ${ran:-?} s, powered off at ${uptime:-?} s)"

# 8. The user-data's write must be in the overlay after the power-off.
qemu-img convert -O raw "$work/overlay.qcow2" "$work/x.raw"
proof=$(debugfs -R 'cat /etc/kiln-proof' "$work/x.raw" 2>/dev/null)
[[ $proof == proof ]] || die "/etc/kiln-proof is missing from the overlay (got '$proof')"
log "overlay: $(du -h "$work/overlay.qcow2" | cut -f1), /etc/kiln-proof = $proof"
ok=yes
echo OK
