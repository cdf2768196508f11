#!/usr/bin/env bash
# Boots a kiln-tiny image under QEMU (TCG) with a NoCloud user-data served from
# 127.0.0.1, and checks that the user-data ran and that its write reached the disk.
#
# Usage: try-boot.sh MANIFEST   (the image.json printed by build-tiny-image.sh)
set -euo pipefail

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
work=$(mktemp -d /tmp/kiln-try-boot.XXXXXX)
server=
ok=no
cleanup() {
    if [[ -n $server ]]; then kill "$server" 2>/dev/null || true; fi
    if [[ $ok == yes && -z ${KILN_TRY_BOOT_KEEP:-} ]]; then
        rm -rf "$work"
    else
        log "kept $work for inspection"
    fi
}
trap cleanup EXIT

# 3. The NoCloud seed: all four files, so no client waits on a 404.
mkdir "$work/seed"
printf '#!/bin/sh\necho KILN-TINY-OK; echo proof > /etc/kiln-proof; sync; poweroff -f\n' >"$work/seed/user-data"
printf 'instance-id: kiln-try-boot\nlocal-hostname: kiln-tiny\n' >"$work/seed/meta-data"
: >"$work/seed/vendor-data"
printf 'version: 2\nethernets: {}\n' >"$work/seed/network-config"

# 4. Serve it on a free port of 127.0.0.1 (the guest sees it at 10.0.2.2).
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$work/seed" >"$work/http.log" 2>&1 &
server=$!
port=
for _ in $(seq 50); do
    port=$(sed -n 's/.* port \([0-9]*\).*/\1/p' "$work/http.log" | head -n1)
    [[ -n $port ]] && break
    sleep 0.1
done
[[ -n $port ]] || die "the HTTP server did not start: $(cat "$work/http.log")"

# 5. A throw-away overlay on the image's disk.
qemu-img create -q -f qcow2 -F qcow2 -b "$disk" "$work/overlay.qcow2"

# 6. Boot. The user-data powers off right after printing its mark, so the
#    time until QEMU exits is the boot-to-user-data time.
log "booting (TCG), user-data at http://10.0.2.2:$port/"
start=$(date +%s%N)
rc=0
timeout 120 qemu-system-x86_64 -accel tcg -machine q35 -m 512 -smp 1 -nodefaults \
    -display none -no-reboot -serial "file:$work/console.log" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "$append ds=nocloud;s=http://10.0.2.2:$port/" \
    -drive "file=$work/overlay.qcow2,if=virtio,discard=unmap" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 || rc=$?
took=$((($(date +%s%N) - start) / 10000000))

# 7. Success: QEMU exited by itself (not killed by timeout) and the user-data ran.
[[ $rc -eq 0 ]] || die "QEMU failed or timed out (exit $rc); console: $work/console.log"
grep -q KILN-TINY-OK "$work/console.log" || die "no KILN-TINY-OK on the console: $work/console.log"
uptime=$(sed -n 's/^\[ *\([0-9.]*\)\] reboot: Power down.*/\1/p' "$work/console.log")
log "boot to user-data and power-off: $((took / 100)).$(printf '%02d' $((took % 100))) s (guest kernel clock: ${uptime:-?} s)"

# 8. The user-data's write must be in the overlay after the power-off.
qemu-img convert -O raw "$work/overlay.qcow2" "$work/x.raw"
proof=$(debugfs -R 'cat /etc/kiln-proof' "$work/x.raw" 2>/dev/null)
[[ $proof == proof ]] || die "/etc/kiln-proof is missing from the overlay (got '$proof')"
log "overlay: $(du -h "$work/overlay.qcow2" | cut -f1), /etc/kiln-proof = $proof"
ok=yes
echo OK
