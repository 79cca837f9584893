#!/usr/bin/env python3
"""Shared harness of the end-to-end tests: each tests/e2e/test_*.py registers tests with @test and ends
with `sys.exit(harness.main("NAME"))`. Every test runs the real casmig binary against throw-away stores.

Usage of a test file: test_X.py --casmig PATH [--only NAME ...] [--keep]
Ends with 'NAME: N passed, N failed'; exit 1 if anything failed.
"""
import argparse
import fcntl
import hashlib
import json
import os
import signal
import sqlite3
import stat
import resource
import subprocess
import sys
import tempfile
import time
import traceback

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


class T:
    def __init__(self, casmig, work):
        self.casmig, self.work = casmig, work

    def store(self, name, packages=4, extra=None):
        root = os.path.join(self.work, name)
        os.makedirs(root)
        for i in range(packages):
            p = os.path.join(root, f"pkg{i:02d}")
            put(p, "LICENSE", b"shared license\n" * 20)
            put(p, f"bin/tool{i}", os.urandom(3000 + i), 0o755)
            put(p, "share/empty", b"")
            os.makedirs(os.path.join(p, "share/empty-dir"))
            os.symlink(f"tool{i}", os.path.join(p, "bin/alias"))
        if extra:
            extra(root)
        return root

    def run(self, store, *args, code=None, env=None):
        cmd = [self.casmig, "--store", store] + [str(a) for a in args]
        p = subprocess.run(cmd, capture_output=True, env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL,
                           timeout=300)
        out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if code is not None and p.returncode != code:
            raise AssertionError(f"{' '.join(cmd[3:])} exited {p.returncode}, expected {code}\nstdout: {out[-600:]}\nstderr: {err[-600:]}")
        return p.returncode, out, err

    def json(self, store, *args, code=0, env=None):
        _, out, _ = self.run(store, "--json", *args, code=code, env=env)
        return json.loads(out)


def seams(t):
    """True if casmig was built with the test seams (tools/build sets -Dtest_seams=true): a crash trace
    then lists the points a migrate reaches. Probed once per test process."""
    if not hasattr(t, "_seams"):
        probe = os.path.join(t.work, "seam-probe")
        put(os.path.join(probe, "p"), "f", b"x")
        trace = os.path.join(t.work, "seam-probe.trace")
        t.run(probe, "migrate", env={"CASMIG_CRASH_TRACE": trace})
        t._seams = os.path.exists(trace)
    return t._seams


def put(pkg, rel, data, mode=0o644):
    path = os.path.join(pkg, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def snapshot(tree, owners=False):
    tree = os.fsencode(tree)
    snap = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            fp = os.path.join(dirpath, n)
            st = os.lstat(fp)
            rel = os.path.relpath(fp, tree)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(fp, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            target = os.readlink(fp) if stat.S_ISLNK(st.st_mode) else None
            mode = None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
            row = (stat.S_IFMT(st.st_mode), mode, digest, target, st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None)
            if owners:
                row += (st.st_uid, st.st_gid)
            snap[rel] = row
    return snap


def kill_at(t, store, command, delays, after_each):
    """Starts `casmig COMMAND`, kills it with SIGKILL after each delay, then calls after_each(delay)."""
    for delay in delays:
        p = subprocess.Popen([t.casmig, "--store", store, command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        after_each(delay)


def backdate_last_run(store, seconds):
    """Makes the last migrate run's end row (migrate::k_run_ended) say it started `seconds` before its
    end, as a long run would have: status and doctor take a run's start from that row."""
    import sqlite3
    db = sqlite3.connect(os.path.join(store, "store.db"))
    try:
        (detail,) = db.execute("SELECT detail FROM journal WHERE detail LIKE 'run ended:%' ORDER BY id DESC").fetchone()
        end_ns = db.execute("SELECT MAX(at_ns) FROM journal").fetchone()[0]
        db.execute("UPDATE journal SET detail = ? WHERE detail = ?",
                   (detail.split("; started_ns")[0] + f"; started_ns {end_ns - int(seconds * 10**9)}", detail))
        db.commit()
    finally:
        db.close()


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def main(suite="e2e"):
    ap = argparse.ArgumentParser()
    ap.add_argument("--casmig", required=True)
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="casmig-e2e-")
    t = T(os.path.abspath(a.casmig), work)
    passed = failed = 0
    for fn in TESTS:
        if a.only and fn.__name__ not in a.only:
            continue
        t0 = time.time()
        try:
            fn(t)
            passed += 1
            print(f"PASS {fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:
            failed += 1
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc()
            print(f"FAIL {fn.__name__}: {detail}", flush=True)
    if failed or a.keep:
        print(f"work directory kept: {work}")
    else:
        subprocess.run(["chmod", "-R", "u+rwX", work])
        subprocess.run(["rm", "-rf", work])
    print(f"{suite}: {passed} passed, {failed} failed")
    return 1 if failed else 0

