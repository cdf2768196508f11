#!/bin/sh
# The customization scripts/bench-vs-packer runs, as root, in both kiln's and
# Packer's VM: install a small .deb from the bench's loopback HTTP server
# (kiln: through its egress proxy; Packer: through a QEMU guestfwd) and check it.
set -eu
curl -fsS -o /tmp/x.deb "$DEB_URL" && dpkg -i /tmp/x.deb &&
    [ "$(kiln-bench-hello)" = "hello from kiln-bench-hello" ] &&
    [ -f /var/lib/kiln-bench-hello/postinst-ran ] &&
    echo "kiln-bench-hello installed"
