#!/bin/sh
# kiln user-data: download kiln's agent, check its sha256, start it.
# Rendered by the kiln-bootstrap crate: each value below is one single-quoted word.
# POSIX sh: runs under busybox sh, dash and bash.
set -u
umask 077

agent_url='https://10.0.2.2:7701'
agent_binary_url='http://10.0.2.2:7702/bootstrap/v1/kiln-agent'
agent_sha256='0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'
target='0191e5b4-7c3a-7d2e-9b1f-3a4c5d6e7f80'
token='tok_3q2-example'
fetch_timeout_secs='600'
default_dir='/var/lib/kiln-agent'
# Empty, or where the agent gets this machine's signed identity (ec2).
identity=''
# Test beds confine everything to a temporary directory with KILN_AGENT_DIR.
dir=${KILN_AGENT_DIR:-$default_dir}
part="$dir/kiln-agent.part"
agent="$dir/kiln-agent"

log() {
    printf 'kiln-bootstrap: %s\n' "$*" >&2
}

die() {
    log "$*"
    exit 1
}

have() {
    command -v "$1" >/dev/null 2>&1
}

# Runs "$@" for at most 120 s when `timeout` exists.
bounded() {
    if have timeout; then
        timeout 120 "$@"
    else
        "$@"
    fi
}

# fetch URL FILE: one download attempt with the first tool this system has.
fetch() {
    if have curl; then
        curl -fsS --connect-timeout 10 --max-time 120 -o "$2" "$1"
    elif have wget; then
        # No -T: busybox 1.35 `wget -T` segfaults; `bounded` sets the limit.
        bounded wget -q -O "$2" "$1"
    elif have python3; then
        bounded python3 -c '
import shutil, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=30) as r, open(sys.argv[2], "wb") as f:
        shutil.copyfileobj(r, f)
except Exception as e:
    sys.exit("python3: %s" % e)
' "$1" "$2"
    fi
}

# sha256_of FILE: prints the file's sha256 in lowercase hex.
sha256_of() {
    if have sha256sum; then
        sum=$(sha256sum "$1") || return 1
        printf '%s\n' "${sum%% *}"
    elif have python3; then
        python3 -c '
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest())
' "$1"
    fi
}

have curl || have wget || have python3 ||
    die "cannot download: none of curl, wget or python3 is installed"
have sha256sum || have python3 ||
    die "cannot check the download: neither sha256sum nor python3 is installed"

log "preparing $dir"
mkdir -p "$dir" || die "cannot create $dir"
cat >"$dir/ca.pem" <<'KILN_CA_EOF' || die "cannot write $dir/ca.pem"
-----BEGIN CERTIFICATE-----
MIIBfzCCASWgAwIBAgIUOFc3a2lsbi10ZXN0LWNhLW5vdC1yZWFsMAoGCCqGSM49
BAMCMBIxEDAOBgNVBAMMB2tpbG4gQ0EwHhcNMjYwMTAxMDAwMDAwWhcNMzYwMTAx
MDAwMDAwWjASMRAwDgYDVQQDDAdraWxuIENBMFkwEwYHKoZIzj0CAQYIKoZIzj0D
-----END CERTIFICATE-----
KILN_CA_EOF

start=$(date +%s)
delay=1
attempt=0
while :; do
    attempt=$((attempt + 1))
    log "attempt $attempt: downloading $agent_binary_url"
    rm -f "$part"
    if fetch "$agent_binary_url" "$part"; then
        actual=$(sha256_of "$part") || actual=''
        if [ "$actual" = "$agent_sha256" ]; then
            log "sha256 verified: $actual"
            break
        fi
        rm -f "$part"
        log "attempt $attempt: sha256 mismatch: expected $agent_sha256, got ${actual:-nothing}; deleted the download"
    else
        log "attempt $attempt: download failed"
    fi
    elapsed=$(($(date +%s) - start))
    if [ "$elapsed" -ge "$fetch_timeout_secs" ]; then
        die "giving up after $attempt attempts in ${elapsed}s: no kiln-agent with sha256 $agent_sha256 from $agent_binary_url"
    fi
    remaining=$((fetch_timeout_secs - elapsed))
    if [ "$delay" -gt "$remaining" ]; then
        delay=$remaining
    fi
    log "retrying in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2))
    if [ "$delay" -gt 30 ]; then
        delay=30
    fi
done

chmod 700 "$part" || die "cannot make $part executable"
mv -f "$part" "$agent" || die "cannot move $part to $agent"
log "starting $agent for target $target"
# The token goes to the agent's environment only, never onto a command line.
KILN_ENROLL_TOKEN=$token
export KILN_ENROLL_TOKEN
set -- --coordinator "$agent_url" --ca "$dir/ca.pem" --target "$target" --dir "$dir"
if [ -n "$identity" ]; then
    set -- "$@" --identity "$identity"
fi
exec "$agent" "$@"
