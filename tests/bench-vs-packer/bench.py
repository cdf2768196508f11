#!/usr/bin/env python3
"""Helpers of scripts/bench-vs-packer (standard library only).

  bench.py stamp                  copy stdin to stdout, each line prefixed with
                                  the host's time (seconds since the epoch)
  bench.py follow GLOB OUT        wait for a file matching GLOB, then copy it to
                                  OUT the same way until SIGTERM (it keeps the
                                  file open, so it outlives the file's removal)
  bench.py report RESULTS.tsv     print the table, the medians and the phases

RESULTS.tsv has one line per run: run, tool, t0 (the command's start), t1
(its end), exit status, image bytes, the files the phases come from (kiln:
`kiln build show --output json`; Packer: its stamped output), the stamped
serial console and the 1-minute load average when the run started.
"""

import glob
import os
import re
import signal
import statistics
import sys
import time
from datetime import datetime, timezone


def stamp():
    for line in iter(sys.stdin.readline, ""):
        sys.stdout.write("%.3f %s" % (time.time(), line))
        sys.stdout.flush()


def follow(pattern, out, wait_secs=900):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    deadline = time.time() + wait_secs
    path = None
    while path is None:
        if stop or time.time() > deadline:
            return
        found = sorted(glob.glob(pattern))
        if found:
            path = found[0]
        else:
            time.sleep(0.1)
    with open(path, "rb") as src, open(out, "w", encoding="utf-8", errors="replace") as dst:
        pending = b""
        while True:
            last = bool(stop)
            chunk = src.read()
            if chunk:
                pending += chunk
                now = time.time()
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    dst.write("%.3f %s\n" % (now, line.decode("utf-8", "replace").replace("\r", "")))
                dst.flush()
            elif last:
                if pending:
                    dst.write("%.3f %s\n" % (time.time(), pending.decode("utf-8", "replace").replace("\r", "")))
                return
            else:
                time.sleep(0.1)


def parse_ts(s):
    """An RFC 3339 timestamp (jiff prints nanoseconds) as seconds since the epoch."""
    if not s:
        return None
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", s)
    if not m:
        return None
    base = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    tz = m.group(3)
    off = 0 if tz == "Z" else (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    secs = base.replace(tzinfo=timezone.utc).timestamp() - off
    return secs + (float(m.group(2)) if m.group(2) else 0.0)


def stamped_lines(path):
    """(host time, text) of a stamped file; none when it is missing."""
    out = []
    if not path or not os.path.exists(path):
        return out
    # newline="\n": a console's carriage returns are not line ends.
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for line in f:
            line = line.replace("\r", "")
            t, _, text = line.rstrip("\n").partition(" ")
            try:
                out.append((float(t), text))
            except ValueError:
                pass
    return out


# Rows of the phase table: (label, kiln's timing field, Packer's output line).
PHASES = [
    ("launched / VM started", "launched_at", "Starting VM, booting disk image"),
    ("agent contact / SSH connected", "agent_contact_at", "Connected to SSH!"),
    ("script started", "script_started_at", "Provisioning with shell script"),
    ("script ended", "script_finished_at", "Gracefully halting virtual machine"),
    ("sealed / VM off, converting", "sealed_at", "Converting hard drive"),
    ("image ready", "image_ready_at", "Build 'qemu.bench' finished"),
    ("target finished", "finished_at", None),
]

# Console rows: (label, regex on the console line).
CONSOLE = [
    ("console: first line", re.compile(r".")),
    ("console: kernel started", re.compile(r"Linux version")),
    ("cloud-init init-local", re.compile(r"Cloud-init v\. \S+ running 'init-local'")),
    ("cloud-init init (network)", re.compile(r"Cloud-init v\. \S+ running 'init'")),
    ("cloud-init modules:config", re.compile(r"Cloud-init v\. \S+ running 'modules:config'")),
    ("cloud-init modules:final", re.compile(r"Cloud-init v\. \S+ running 'modules:final'")),
    ("console: login prompt", re.compile(r"login: ")),
    ("kiln-bootstrap: first line", re.compile(r"kiln-bootstrap: ")),
    ("kiln-agent: enrolled", re.compile(r"kiln_agent::enroll: enrolled")),
    ("kiln-agent: seal (files removed)", re.compile(r"kiln_agent::seal: ")),
    ("cloud-init finished", re.compile(r"Cloud-init v\. \S+ finished at")),
    ("console: power down", re.compile(r"reboot: Power down")),
]
UP = re.compile(r"Up (\d+(?:\.\d+)?) seconds")


def kiln_phases(show_json, t0):
    import json

    try:
        with open(show_json, encoding="utf-8") as f:
            build = json.load(f)
        timings = build["targets"][0]["timings"]
    except (OSError, ValueError, KeyError, IndexError):
        return {}
    out = {}
    for label, field, _ in PHASES:
        t = parse_ts(timings.get(field))
        if t is not None:
            out[label] = t - t0
    return out


def packer_phases(stamped, t0):
    out = {}
    lines = stamped_lines(stamped)
    for label, _, needle in PHASES:
        if needle is None:
            continue
        for t, text in lines:
            if needle in text:
                out[label] = t - t0
                break
    return out


def console_phases(stamped, t0):
    out = {}
    for t, text in stamped_lines(stamped):
        for label, rx in CONSOLE:
            if label not in out and rx.search(text):
                up = UP.search(text)
                out[label] = (t - t0, float(up.group(1)) if up else None)
    return out


def fmt(v, width=8):
    return ("%.1f" % v if v is not None else "-").rjust(width)


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b else None


def report(results):
    rows = []
    with open(results, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 8:
                continue
            run, tool, t0, t1, rc, size, phases, console = parts[:8]
            load = parts[8] if len(parts) > 8 else "-"
            rows.append(
                dict(run=run, tool=tool, t0=float(t0), t1=float(t1), rc=int(rc),
                     size=int(size) if size else None, phases=phases, console=console, load=load)
            )
    mib = 1024 * 1024
    print("run  tool    wall_s  image_MiB  exit  load1")
    for r in rows:
        wall = r["t1"] - r["t0"]
        size = r["size"] / mib if r["size"] is not None else None
        print("%-4s %-7s %6.1f  %9s  %4d  %5s" % (r["run"], r["tool"], wall, fmt(size, 9).strip(), r["rc"], r["load"]))
    ok = [r for r in rows if r["rc"] == 0]
    walls = {t: [r["t1"] - r["t0"] for r in ok if r["tool"] == t] for t in ("kiln", "packer")}
    sizes = {t: [r["size"] / mib for r in ok if r["tool"] == t and r["size"] is not None] for t in ("kiln", "packer")}
    mk, mp = median(walls["kiln"]), median(walls["packer"])
    sk, sp = median(sizes["kiln"]), median(sizes["packer"])
    print()
    print("kiln median %s s, packer median %s s, ratio kiln/packer = %s"
          % (fmt(mk, 0), fmt(mp, 0), "%.2f" % ratio(mk, mp) if ratio(mk, mp) else "-"))
    print("image median: kiln %s MiB, packer %s MiB, ratio kiln/packer = %s"
          % (fmt(sk, 0), fmt(sp, 0), "%.2f" % ratio(sk, sp) if ratio(sk, sp) else "-"))
    if len(ok) != len(rows):
        print("(medians over successful runs only: %d of %d runs failed)" % (len(rows) - len(ok), len(rows)))

    cols = ["%s%s" % (r["tool"][0], r["run"]) for r in rows]
    print()
    print("phases, seconds since the command started (kiln: `kiln build show`; packer: its output)")
    print("%-32s%s" % ("", "".join(c.rjust(9) for c in cols)))
    per_run = [kiln_phases(r["phases"], r["t0"]) if r["tool"] == "kiln" else packer_phases(r["phases"], r["t0"])
               for r in rows]
    for label, _, _ in PHASES:
        print("%-32s%s" % (label, "".join(fmt(p.get(label), 9) for p in per_run)))
    print("%-32s%s" % ("command returned", "".join(fmt(r["t1"] - r["t0"], 9) for r in rows)))

    print()
    print("serial console, seconds since the command started (guest uptime in the line)")
    print("%-32s%s" % ("", "".join(c.rjust(18) for c in cols)))
    per_run = [console_phases(r["console"], r["t0"]) for r in rows]
    for label, _ in CONSOLE:
        cells = []
        for p in per_run:
            v = p.get(label)
            if v is None:
                cells.append("-".rjust(18))
            elif v[1] is None:
                cells.append(("%.1f" % v[0]).rjust(18))
            else:
                cells.append(("%.1f (up %.1f)" % v).rjust(18))
        print("%-32s%s" % (label, "".join(cells)))


def main(argv):
    if len(argv) == 2 and argv[1] == "stamp":
        stamp()
    elif len(argv) == 4 and argv[1] == "follow":
        follow(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "report":
        report(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
