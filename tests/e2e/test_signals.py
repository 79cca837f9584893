#!/usr/bin/env python3
"""Signals and lock waits (issue 10, items 2 and 3): SIGTERM/SIGINT in the middle of migrate, cleanup,
rollback and convert stop at the next safe point (exit 143/130, one line saying what was done and how
to resume, temp/ empty, a rerun completes exactly); a second signal stops at once (the rerun is still
exact); `--lock-wait DUR` waits for the store lock (and gc.lock), naming its holder, then exits 4.
The signals come from casmig itself at an exact point (CASMIG_HOOK_AT, test builds only)."""
import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

N = 30  # packages: enough that a signal at the second batch/tree leaves many not started


def big_store(t, name, packages=N, blob=0):
    """t.store's packages, each with a `data/blob` of `blob` random bytes (0: none)."""
    s = t.store(name, packages)
    if blob:
        for i in range(packages):
            put(os.path.join(s, f"pkg{i:02d}"), "data/blob", os.urandom(blob))
    return s


def trees(s, packages=N):
    return {f"pkg{i:02d}": snapshot(os.path.join(s, f"pkg{i:02d}")) for i in range(packages)}


def hook(point, cmd):
    return {"CASMIG_HOOK_AT": point, "CASMIG_HOOK_CMD": cmd}


def temp_entries(s):
    d = os.path.join(s, "temp")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def interrupted_line(err, sig, pattern):
    """The one 'casmig: interrupted (SIG…): …' line; the groups of `pattern` matched in it, as ints."""
    lines = [ln for ln in err.splitlines() if ln.startswith("casmig: interrupted")]
    expect(len(lines) == 1, f"expected one 'casmig: interrupted' line, got {lines!r}\nstderr: {err[-800:]}")
    m = re.fullmatch(rf"casmig: interrupted \({sig}\): {pattern}", lines[0])
    expect(m, f"the interrupted line does not say what was done and how to resume: {lines[0]!r}")
    return [int(g) for g in m.groups() if g is not None and g.isdigit()]


def exact_after_materialize(t, s, want):
    """Every package materialized from the CAS equals its snapshot taken before (content, modes,
    symlinks, mtimes)."""
    for name, snap in want.items():
        dest = os.path.join(t.work, f"mat-{os.path.basename(s)}-{name}")
        t.run(s, "materialize", name, dest, code=0)
        expect(snapshot(dest) == snap, f"{name}: materialized tree differs from the legacy tree before")


def seams_or_skip(t):
    if not harness.seams(t):
        print("SKIP: casmig built without test seams (CASMIG_HOOK_AT)")
        return False
    return True


# ------------------------------------------------------------------ migrate

def migrate_stopped_by(t, name, sig, code):
    s = big_store(t, name, blob=120_000)
    before = trees(s)
    kill = f"kill -{sig[3:]} $PPID"
    # --io-limit spreads the run over about 9 s, so that the second batch commit (about 1 s apart) comes
    # with packages still not started.
    rc, out, err = t.run(s, "migrate", "--io-limit", "400K", env=hook("migrate.committed@2", kill))
    expect(rc == code, f"migrate with {sig}: exit {rc}, expected {code}\nstderr: {err[-800:]}")
    migrated, verified, left = interrupted_line(
        err, sig, r"(\d+) packages migrated \((\d+) verified\), (\d+) left pending(, \d+ migrated but not verified yet)?; "
                  r"run casmig migrate to continue")
    expect(migrated >= 1 and left >= 1, f"not mid-way: {migrated} migrated, {left} left")
    expect(temp_entries(s) == [], f"temp/ after the interrupted migrate: {temp_entries(s)}")
    st = t.json(s, "status")["packages"]
    expect(st["pending"] == left and st["migrated"] + st["verified"] == migrated and st["in_progress"] == 0,
           f"status after the interrupted migrate does not match its line ({migrated} migrated, {left} left): {st}")
    t.run(s, "migrate", code=0)
    st = t.json(s, "status")["packages"]
    expect(st["verified"] == N, f"the rerun did not verify every package: {st}")
    expect(trees(s) == before, "legacy trees changed")
    exact_after_materialize(t, s, before)


@test
def sigterm_in_the_middle_of_migrate_stops_at_a_safe_point_and_the_rerun_completes(t):
    if seams_or_skip(t):
        migrate_stopped_by(t, "mig-term", "SIGTERM", 143)


@test
def sigint_in_the_middle_of_migrate_stops_at_a_safe_point_and_the_rerun_completes(t):
    if seams_or_skip(t):
        migrate_stopped_by(t, "mig-int", "SIGINT", 130)


# ------------------------------------------------------------------ cleanup

@test
def sigterm_in_the_middle_of_cleanup_leaves_the_rest_marked_and_the_rerun_completes(t):
    if not seams_or_skip(t):
        return
    s = big_store(t, "cleanup-term")
    before = trees(s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    rc, out, err = t.run(s, "-j", "2", "cleanup", env=hook("cleanup.moved-aside@2", "kill -TERM $PPID"))
    expect(rc == 143, f"cleanup with SIGTERM: exit {rc}\nstderr: {err[-800:]}")
    removed, left = interrupted_line(
        err, "SIGTERM", r"(\d+) legacy trees removed, (\d+) left marked for cleanup; run casmig cleanup to continue")
    expect(removed >= 1 and left >= 1, f"not mid-way: {removed} removed, {left} left")
    expect(temp_entries(s) == [], f"temp/ after the interrupted cleanup: {temp_entries(s)}")
    tr = t.json(s, "status")["legacy_trees"]
    expect(tr["removed"] == removed and tr["marked"] == left, f"status does not match the line: {tr}")
    present = [p for p in before if os.path.isdir(os.path.join(s, p))]
    expect(len(present) == left, f"{len(present)} trees on disk, {left} left marked")
    for p in present:
        expect(snapshot(os.path.join(s, p)) == before[p], f"{p}: a tree cleanup did not start changed")
    t.run(s, "cleanup", code=0)
    expect(t.json(s, "status")["legacy_trees"]["removed"] == N, "the rerun did not finish cleanup")
    exact_after_materialize(t, s, before)


# ------------------------------------------------------------------ rollback

@test
def sigterm_in_the_middle_of_rollback_keeps_the_mode_and_the_rerun_completes(t):
    if not seams_or_skip(t):
        return
    s = big_store(t, "rollback-term")
    before = trees(s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    rc, out, err = t.run(s, "-j", "2", "rollback", env=hook("rollback.staged@2", "kill -TERM $PPID"))
    expect(rc == 143, f"rollback with SIGTERM: exit {rc}\nstderr: {err[-800:]}")
    rebuilt, left = interrupted_line(
        err, "SIGTERM", r"(\d+) legacy trees rebuilt, (\d+) left to rebuild \(store stays file-level\); "
                        r"run casmig rollback to continue")
    expect(rebuilt >= 1 and left >= 1 and rebuilt + left == N, f"not mid-way: {rebuilt} rebuilt, {left} left")
    expect(temp_entries(s) == [], f"temp/ after the interrupted rollback: {temp_entries(s)}")
    expect(t.json(s, "status")["mode"] == "file-level", "the mode changed although trees are left")
    present = [p for p in before if os.path.isdir(os.path.join(s, p))]
    expect(len(present) == rebuilt, f"{len(present)} trees on disk, {rebuilt} rebuilt")
    for p in present:
        expect(snapshot(os.path.join(s, p)) == before[p], f"{p}: a rebuilt tree is not exact")
    t.run(s, "rollback", code=0)
    expect(t.json(s, "status")["mode"] == "legacy", "the rerun did not finish the rollback")
    expect(trees(s) == before, "trees after the completed rollback differ")
    expect(temp_entries(s) == [], f"temp/ after the rollback: {temp_entries(s)}")


# ------------------------------------------------------------------ convert

@test
def sigterm_in_the_middle_of_convert_keeps_the_cursor_and_the_rerun_completes(t):
    if not seams_or_skip(t):
        return
    s = big_store(t, "convert-term")
    for i in range(N):  # compressible contents, one object each, spread over the shards
        put(os.path.join(s, f"pkg{i:02d}"), "share/text", (f"line {i} of a compressible text\n" * 400).encode())
    before = trees(s)
    t.run(s, "migrate", code=0)
    rc, out, err = t.run(s, "-j", "1", "convert", "--compress", "--no-dictionary",
                         env=hook("convert.recorded@2", "kill -TERM $PPID"))
    expect(rc == 143, f"convert with SIGTERM: exit {rc}\nstderr: {err[-800:]}")
    converted, left = interrupted_line(
        err, "SIGTERM", r"(\d+) objects converted, (\d+) of objects/'s 256 fan-out directories left; "
                        r"run casmig convert --compress to continue")
    expect(converted >= 1 and 0 < left < 256, f"not mid-way: {converted} converted, {left} shards left")
    expect(temp_entries(s) == [], f"temp/ after the interrupted convert: {temp_entries(s)}")
    t.run(s, "verify", "--objects", code=0)
    t.run(s, "convert", "--compress", code=0)
    t.run(s, "verify", "--objects", code=0)
    exact_after_materialize(t, s, before)


# ------------------------------------------------------------------ a second signal

@test
def a_second_signal_stops_at_once_and_the_rerun_is_still_exact(t):
    if not seams_or_skip(t):
        return
    # The pause lets the first signal's handler run first (two pending SIGTERMs would merge into one).
    twice = "kill -TERM $PPID; sleep 0.5; kill -TERM $PPID"
    s = big_store(t, "twice", blob=120_000)
    before = trees(s)
    rc, _, err = t.run(s, "migrate", "--io-limit", "400K", env=hook("migrate.committed@2", twice))
    expect(rc == -signal.SIGTERM, f"migrate with two SIGTERMs: exit {rc}, expected death by SIGTERM\n{err[-800:]}")
    expect("casmig: interrupted" not in err, f"the second signal did not stop it at once: {err[-400:]}")
    t.run(s, "migrate", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == N, "the rerun did not verify every package")
    expect(temp_entries(s) == [], f"temp/ after the rerun: {temp_entries(s)}")
    t.run(s, "cutover", code=0)
    rc, _, err = t.run(s, "-j", "2", "cleanup", env=hook("cleanup.moved-aside@2", twice))
    expect(rc == -signal.SIGTERM, f"cleanup with two SIGTERMs: exit {rc}\n{err[-800:]}")
    t.run(s, "cleanup", code=0)
    expect(temp_entries(s) == [], f"temp/ after the cleanup rerun: {temp_entries(s)}")
    exact_after_materialize(t, s, before)
    rc, _, err = t.run(s, "-j", "2", "rollback", env=hook("rollback.staged@2", twice))
    expect(rc == -signal.SIGTERM, f"rollback with two SIGTERMs: exit {rc}\n{err[-800:]}")
    t.run(s, "rollback", code=0)
    expect(trees(s) == before, "trees after the rollback rerun differ")
    expect(temp_entries(s) == [], f"temp/ after the rollback rerun: {temp_entries(s)}")


@test
def a_signal_delivered_twice_at_once_is_one_request(t):
    # `timeout` signals the command and then its process group: the same SIGTERM twice, microseconds
    # apart. That is one request: a safe stop (exit 143, the line, temp/ empty), not a stop at once.
    if not seams_or_skip(t):
        return
    s = big_store(t, "dup", blob=120_000)
    dup = "kill -TERM $PPID; sleep 0.05; kill -TERM $PPID"
    rc, _, err = t.run(s, "migrate", "--io-limit", "400K", env=hook("migrate.committed@2", dup))
    expect(rc == 143 and "casmig: interrupted (SIGTERM)" in err, f"two SIGTERMs 50 ms apart: exit {rc}\n{err[-800:]}")
    expect(temp_entries(s) == [], f"temp/ after the safe stop: {temp_entries(s)}")
    t.run(s, "migrate", code=0)


# ------------------------------------------------------------------ --lock-wait

class Held:
    """Holds <store>/migration/<name> as another process would (flock on its own open file)."""

    def __init__(self, s, name="lock", text=None):
        os.makedirs(os.path.join(s, "migration"), exist_ok=True)
        self.f = open(os.path.join(s, "migration", name), "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if text is not None:
            self.f.truncate(0)
            self.f.write(text)
            self.f.flush()

    def release(self):
        if self.f:
            self.f.close()
            self.f = None


def start(t, s, *args):
    return subprocess.Popen([t.casmig, "--store", s] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


@test
def lock_wait_names_the_holder_and_goes_on_once_the_lock_is_released(t):
    s = big_store(t, "wait-released", 3)
    held = Held(s, text=f"casmig migrate pid {os.getpid()}\n")
    t0 = time.time()
    p = start(t, s, "--lock-wait", "3s", "migrate")
    time.sleep(1)
    expect(p.poll() is None, "migrate did not wait for the lock")
    held.release()
    out, err = p.communicate(timeout=120)
    err = err.decode()
    expect(p.returncode == 0, f"exit {p.returncode} after the lock was released: {err[-600:]}")
    expect(time.time() - t0 >= 1, "it did not wait")
    lines = [ln for ln in err.splitlines() if "waiting" in ln]
    expect(lines == [f"casmig: waiting up to 3s for {s}/migration/lock, held by casmig migrate pid {os.getpid()}"],
           f"the waiting line does not name the holder: {err!r}")
    expect(t.json(s, "status")["packages"]["verified"] == 3, "not migrated after the wait")


@test
def lock_wait_gives_up_after_the_wait_with_exit_4_and_changes_nothing(t):
    s = big_store(t, "wait-held", 3)
    held = Held(s, text=f"casmig migrate pid {os.getpid()}\n")
    t0 = time.time()
    rc, _, err = t.run(s, "--lock-wait", "2s", "migrate")
    took = time.time() - t0
    expect(rc == 4, f"exit {rc} with the lock held throughout: {err[-600:]}")
    expect(2 <= took < 30, f"gave up after {took:.1f}s, not about 2s")
    expect("waited 2s" in err and f"pid {os.getpid()}" in err, f"the busy line does not say it waited: {err!r}")
    expect(not os.path.exists(os.path.join(s, "store.db")), "the store changed although the lock was never taken")
    # Without --lock-wait: exit 4 at once, as before.
    t0 = time.time()
    rc, _, err = t.run(s, "migrate")
    expect(rc == 4 and time.time() - t0 < 2 and "waiting" not in err, f"without --lock-wait: exit {rc}, {err!r}")
    held.release()
    # A malformed duration is a usage error.
    t.run(s, "--lock-wait", "5x", "migrate", code=2)


@test
def a_signal_during_a_lock_wait_stops_it_at_once(t):
    s = big_store(t, "wait-int", 2)
    held = Held(s, text=f"casmig migrate pid {os.getpid()}\n")
    p = start(t, s, "--lock-wait", "60s", "migrate")
    time.sleep(1)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    err = err.decode()
    expect(p.returncode == 130 and time.time() - t0 < 5, f"exit {p.returncode} after SIGINT during the wait: {err!r}")
    expect("interrupted (SIGINT) while waiting for" in err and "nothing was done" in err, f"no line says so: {err!r}")
    held.release()
    expect(not os.path.exists(os.path.join(s, "store.db")), "the store changed")


@test
def materialize_waits_for_gc_lock_with_lock_wait(t):
    s = big_store(t, "wait-gc", 2)
    before = trees(s, 2)
    t.run(s, "migrate", code=0)
    held = Held(s, "gc.lock", text=f"casmig gc pid {os.getpid()}\n")
    rc, _, err = t.run(s, "materialize", "pkg00", os.path.join(t.work, "wait-gc-busy"))
    expect(rc == 4, f"materialize while gc.lock is held, no wait: exit {rc} {err!r}")
    dest = os.path.join(t.work, "wait-gc-dest")
    p = start(t, s, "--lock-wait", "10s", "materialize", "pkg00", dest)
    time.sleep(1)
    expect(p.poll() is None, "materialize did not wait for gc.lock")
    held.release()
    out, err = p.communicate(timeout=60)
    err = err.decode()
    expect(p.returncode == 0, f"materialize after the wait: exit {p.returncode} {err!r}")
    expect(f"waiting up to 10s for {s}/migration/gc.lock, held by casmig gc pid {os.getpid()}" in err,
           f"no waiting line naming gc: {err!r}")
    expect(snapshot(dest) == before["pkg00"], "materialized tree differs")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-signals"))
