#!/usr/bin/env python3
"""The progress display (issue 10, item 5): on a terminal (a pty here) one line redrawn in place that fits
40, 80 and 200 columns without wrapping, named phases, real rates in every phase, a summary line per
phase; with --progress always into a file or pipe, plain log lines every few seconds and no redraws."""
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, expect  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def run_on_pty(t, store, cols, *args):
    """Runs casmig with stderr on a pty of `cols` columns; returns (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    p = subprocess.Popen([t.casmig, "--store", store, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.wait()
    os.close(master)
    return p.returncode, out.decode(errors="replace")


def many_packages(root):
    for i in range(120):
        for k in range(20):
            put(os.path.join(root, f"p{i:03d}"), f"d/f{k}", os.urandom(2000 + k))


@test
def the_bar_fits_the_terminal_at_40_80_and_200_columns(t):
    for cols in (40, 80, 200):
        s = t.store(f"prog-{cols}", 0, many_packages)
        code, out = run_on_pty(t, s, cols, "migrate")
        expect(code == 0, f"{cols} cols: exit {code}: {out[-300:]!r}")
        frames = [ANSI.sub("", f) for f in re.split(r"[\r\n]", out) if ANSI.sub("", f).strip()]
        bars = [f for f in frames if not f.startswith("casmig: ")]
        expect(bars, f"{cols} cols: nothing drawn: {out[:300]!r}")
        # The redrawn line never reaches the last column (a summary line is printed once and may wrap).
        too_long = [f for f in bars if len(f) > cols - 1]
        expect(not too_long, f"{cols} cols: redrawn lines wider than the terminal: {too_long[:2]}")
        code, out2 = run_on_pty(t, s, cols, "verify", "--objects")
        expect(code == 0, f"{cols} cols: verify exit {code}: {out2[-300:]!r}")
        frames += [ANSI.sub("", f) for f in re.split(r"[\r\n]", out2) if ANSI.sub("", f).strip()]
        bars = [f for f in frames if not f.startswith("casmig: ")]
        expect({"migrate", "verify"} <= {f.split()[0] for f in bars} and any(f.startswith("verify objects ") for f in bars),
               f"{cols} cols: phases not named: {sorted({f.split()[0] for f in bars})}")
        for phase, what in (("migrate", "120 pkgs, 2,400 files"), ("verify", "120 pkgs"), ("verify objects", "2,400 objects")):
            expect(any(f.startswith(f"casmig: {phase} done: {what}") for f in frames),
                   f"{cols} cols: no summary line for {phase}: {[f for f in frames if f.startswith('casmig: ')]}")
        if cols >= 80:
            rates = [m.group(0) for f in bars for m in [re.search(r"\S+ (B|kB|KB|KiB|MB|MiB|GB|GiB)/s|\S+ files/s", f)] if m]
            expect(rates and not any(r.startswith("0 ") or r.startswith("0.0 ") for r in rates),
                   f"{cols} cols: a zero or missing rate: {rates[:5]}")


@test
def progress_always_into_a_log_writes_plain_lines_every_few_seconds(t):
    def slow(root):
        for i in range(4):
            put(os.path.join(root, f"p{i}"), "big", os.urandom(600 * 1024))
    s = t.store("prog-log", 0, slow)
    t0 = time.time()
    code, out, err = t.run(s, "--progress", "always", "migrate", "--io-limit", "200K")
    took = time.time() - t0
    expect(code == 0 and took > 6, f"exit {code} after {took:.1f}s")
    expect("\r" not in err and "\x1b" not in err, f"redraw codes in a log: {err[:200]!r}")
    lines = [line for line in err.splitlines() if line.startswith("casmig: migrate ")]
    expect(len(lines) >= 1 and all(len(line) < 200 for line in lines), f"no periodic progress lines: {err!r}")
    expect(any(line.startswith("casmig: migrate done: 4 pkgs") for line in err.splitlines()), f"no summary: {err!r}")
    # The default (auto) writes nothing to a non-terminal.
    s2 = t.store("prog-quiet", 2)
    code, out, err = t.run(s2, "migrate")
    expect(code == 0 and err == "", f"auto progress into a pipe: {err!r}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-progress"))
