#!/bin/sh
# Runs as root inside the VM; whatever it changes is in the new image.
set -eu
echo "hello from kiln, baked $(date -u +%Y-%m-%dT%H:%M:%SZ)" > /etc/motd
cat /etc/motd
uname -sr
