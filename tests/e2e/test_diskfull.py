#!/usr/bin/env python3
"""Disk full: migrate's space preflight and --no-space-check, ENOSPC in the middle of a migrate (staged
files deleted, finished packages committed, reruns make progress), read-only commands on a full disk,
plan's exit code when the space is short.

Real full disks are small tmpfs mounts (root only; a test that needs one says "skip" when mount is not
allowed). The ENOSPC tests that need no mount use the I/O seam (CASMIG_FAULT, test builds only).

Usage: test_diskfull.py --casmig PATH [--only NAME ...] [--keep]
"""
import contextlib
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

KiB = 1024


@contextlib.contextmanager
def small_fs(t, name, size_kib):
    """A tmpfs of size_kib mounted at <work>/<name>; yields its path, or None where mount is not allowed."""
    mnt = os.path.join(t.work, name)
    os.makedirs(mnt)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mnt], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  skip: cannot mount a small tmpfs here ({p.stderr.strip() or 'mount failed'}); "
              "the seam tests cover the logic", flush=True)
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt])


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def make_store(root, sizes):
    """One package per size: a random file of that size, plus a small file all packages share."""
    os.makedirs(root)
    for i, size in enumerate(sizes):
        p = os.path.join(root, f"pkg{i:02d}")
        put(p, "bin/data", os.urandom(size))
        put(p, "LICENSE", b"the same license\n" * 10)
        os.symlink("data", os.path.join(p, "bin/link"))
    return root


def fill(mnt):
    """Fills the filesystem to the last block."""
    fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 20, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    expect(free_bytes(mnt) < 4096, f"filler left {free_bytes(mnt)} bytes free")


def temp_files(store):
    out = []
    for dirpath, _, files in os.walk(os.path.join(store, "temp")):
        out += [os.path.join(dirpath, f) for f in files]
    return out


def states(t, s):
    return t.json(s, "status")["packages"]


def check_materialize(t, s, pkg, dest_root):
    """The package rebuilt from the CAS (to a destination on another filesystem) equals its legacy tree."""
    dest = os.path.join(dest_root, pkg)
    t.run(s, "materialize", pkg, dest, code=0)
    expect(snapshot(dest) == snapshot(os.path.join(s, pkg)), f"materialize {pkg} differs from its legacy tree")


# ------------------------------------------------------------------ plan and the preflight

@test
def plan_exits_3_when_space_is_short(t):
    with small_fs(t, "fs-plan", 8192) as mnt:
        if not mnt:
            return
        s = make_store(os.path.join(mnt, "s"), [600 * KiB] * 8)  # ~4.8 MiB of legacy, ~3 MiB free
        code, out, err = t.run(s, "--json", "plan")
        expect(code == 3, f"plan exited {code} on a store that does not fit, expected 3\n{err}")
        j = json.loads(out)
        expect(j["enough_space"] is False and j["needed_bytes"] > j["free_bytes"], f"plan JSON: {j}")
        expect(0 < j["packages_that_fit"] < 8, f"packages_that_fit: {j}")
        expect(err.count("\n") == 1 and "not enough space" in err and "--limit" in err, f"plan stderr: {err!r}")
        expect(not os.path.exists(os.path.join(s, "store.db")), "plan wrote a catalog")
        # The same store with fewer packages fits: exit 0, enough_space true.
        j = t.json(s, "plan", "--limit", j["packages_that_fit"], code=0)
        expect(j["enough_space"] is True and j["needed_bytes"] <= j["free_bytes"], f"plan --limit: {j}")


@test
def migrate_refuses_when_the_selection_cannot_fit(t):
    with small_fs(t, "fs-refuse", 8192) as mnt:
        if not mnt:
            return
        s = make_store(os.path.join(mnt, "s"), [600 * KiB] * 8)
        before = snapshot(s)
        code, out, err = t.run(s, "migrate")
        expect(code == 3, f"migrate exited {code} on a store that does not fit, expected 3\n{err}")
        expect(err.count("\n") == 1, f"refusal is not one line: {err!r}")
        for word in ["needs", "free", "--limit", "--no-space-check"]:
            expect(word in err, f"refusal lacks {word!r}: {err!r}")
        expect(os.listdir(os.path.join(s, "objects", "00")) == [] if os.path.isdir(os.path.join(s, "objects", "00")) else True,
               "migrate wrote objects")
        expect(temp_files(s) == [], f"temp files after a refusal: {temp_files(s)}")
        expect({k: v for k, v in snapshot(s).items() if k.startswith(b"pkg")} ==
               {k: v for k, v in before.items() if k.startswith(b"pkg")}, "a legacy tree changed")
        expect(states(t, s)["pending"] == 8, "packages changed state on a refusal")
        # The refusal's --limit suggestion fits.
        n = int(err.split("--limit ")[1].split()[0])
        t.run(s, "migrate", "--limit", n, code=0)
        st = states(t, s)
        expect(st["verified"] == n and st["pending"] == 8 - n, f"after --limit {n}: {st}")


@test
def preflight_counts_dedup_before_refusing(t):
    """The stat-only bound (every file new) does not fit, but the content is already in the CAS: migrate
    must hash, see that it fits, and go."""
    with small_fs(t, "fs-dedup", 8192) as mnt:
        if not mnt:
            return
        s = os.path.join(mnt, "s")
        blob = os.urandom(1024 * KiB)
        make_store(s, [])
        for i in range(5):  # 5 copies of one content: 5 MiB of legacy, 1 MiB of distinct content
            put(os.path.join(s, f"pkg{i:02d}"), "bin/data", blob)
        free = free_bytes(mnt)
        expect(free < 5 * 1024 * KiB, f"test setup: {free} bytes free, the upper bound must not fit")
        t.run(s, "migrate", code=0)
        expect(states(t, s)["verified"] == 5, "not every package migrated")


@test
def no_space_check_migrates_what_fits_and_reruns_progress(t):
    with small_fs(t, "fs-enospc", 8192) as mnt:
        if not mnt:
            return
        # Sizes that do not fit together; some fit on their own after others took their share.
        sizes = [900 * KiB, 400 * KiB, 1100 * KiB, 300 * KiB, 1000 * KiB, 200 * KiB, 800 * KiB, 500 * KiB]
        s = make_store(os.path.join(mnt, "s"), sizes)
        code, out, err = t.run(s, "-j", "2", "migrate", "--no-space-check")
        expect(code == 1, f"migrate --no-space-check on a disk too small exited {code}, expected 1\n{err}")
        lines = [l for l in err.splitlines() if l]
        expect(len(lines) == 1 and "disk full" in lines[0] and "not started" in lines[0] and "free space" in lines[0],
               f"stderr is not one summary line: {err!r}")
        expect(temp_files(s) == [], f"staged files left in temp/: {temp_files(s)}")
        first = states(t, s)
        expect(first["verified"] >= 1 and first["failed"] == 0, f"nothing migrated on the first run: {first}")
        # Reruns with the same free space: each migrates what now fits, until nothing more does.
        for _ in range(len(sizes)):
            before = states(t, s)["verified"]
            code, _, err = t.run(s, "migrate", "--no-space-check")
            expect(code in (0, 1), f"rerun exited {code}: {err}")
            expect(temp_files(s) == [], f"staged files left in temp/ by a rerun: {temp_files(s)}")
            if states(t, s)["verified"] == before:
                break
        st = states(t, s)
        expect(st["verified"] + st["pending"] + st["in_progress"] == len(sizes) and st["failed"] == 0, f"states: {st}")
        # Each package left pending does not fit even alone (plan's exact count); the others are exact.
        dest = os.path.join(t.work, "dest-enospc")
        os.makedirs(dest)
        for i in range(len(sizes)):
            pkg = f"pkg{i:02d}"
            code, out, err = t.run(s, "--json", "plan", pkg)
            j = json.loads(out)
            if j["packages"] == 1:
                expect(code == 3 and j["enough_space"] is False, f"{pkg} was left pending though it fits alone: {j}")
            else:
                check_materialize(t, s, pkg, dest)
        t.run(s, "verify", code=0)


# ------------------------------------------------------------------ read-only commands on a full disk

def full_store(t, mnt, dest_name):
    """A store on mnt with 3 of 6 packages migrated, then the filesystem filled to the last block."""
    s = make_store(os.path.join(mnt, "s"), [200 * KiB] * 6)
    t.run(s, "migrate", "--limit", 3, code=0)
    return s


def check_readers(t, s, mnt, expect_verified, round_):
    st = t.json(s, "status")
    expect(st["packages"]["verified"] == expect_verified and st["mode"] == "dual", f"status on a full disk: {st}")
    dest = os.path.join(t.work, f"dest-{os.path.basename(mnt)}-{round_}")
    os.makedirs(dest)
    check_materialize(t, s, "pkg00", dest)
    code, out, err = t.run(s, "verify")
    expect(code == 0, f"verify on a full disk exited {code}: {err}")
    code, out, err = t.run(s, "--json", "plan")
    expect(code == 3 and json.loads(out)["enough_space"] is False, f"plan on a full disk: {code} {err}")
    code, _, err = t.run(s, "migrate")
    expect(code == 3 and "not enough space" in err, f"migrate on a full disk: {code} {err!r}")


@test
def readers_work_on_a_full_disk(t):
    with small_fs(t, "fs-full", 4096) as mnt:
        if not mnt:
            return
        s = full_store(t, mnt, "full")
        for f in ["store.db-wal", "store.db-shm"]:
            expect(not os.path.exists(os.path.join(s, f)), f"{f} left after a clean migrate")
        fill(mnt)
        check_readers(t, s, mnt, 3, 1)
        # Again, now that a failed first open may have left a -shm stub behind.
        check_readers(t, s, mnt, 3, 2)


@test
def status_on_a_full_disk_sees_commits_still_in_the_wal(t):
    """A writer killed after its commit leaves the commit in store.db-wal: a reader on a full disk must
    read the WAL (not only store.db), or it reports stale states."""
    if not seams_or_skip(t):
        return
    with small_fs(t, "fs-wal", 4096) as mnt:
        if not mnt:
            return
        s = make_store(os.path.join(mnt, "s"), [200 * KiB] * 4)
        t.run(s, "migrate", "--no-verify", "--limit", 2, code=None, env={"CASMIG_CRASH_AT": "migrate.committed"})
        expect(os.path.getsize(os.path.join(s, "store.db-wal")) > 0, "test setup: the commit is not in the WAL")
        # Without its -shm (lost, or never copied with a backup), the first reader must rebuild the WAL
        # index from the WAL: on a full disk it cannot do that in a new -shm file.
        os.unlink(os.path.join(s, "store.db-shm"))
        fill(mnt)
        st = t.json(s, "status")
        expect(st["packages"]["migrated"] == 2, f"status on a full disk missed the commits in the WAL: {st['packages']}")
        dest = os.path.join(t.work, "dest-wal")
        os.makedirs(dest)
        check_materialize(t, s, "pkg01", dest)


harness_seams = harness.seams


def seams_or_skip(t):
    if harness_seams(t):
        return True
    print("  skip: casmig was built without test seams (tools/build turns them on)", flush=True)
    return False


# ------------------------------------------------------------------ ENOSPC through the seam (no mount needed)

def seam_store(t, name):
    s = t.store(name, 6)
    for i in range(6):  # large enough to be streamed through several writes
        put(os.path.join(s, f"pkg{i:02d}"), "share/blob", os.urandom(9 * 1024 * 1024 + i))
    return s


def check_after_fault(t, s, err):
    lines = [l for l in err.splitlines() if l]
    expect(len(lines) == 1 and "disk full" in lines[0] and "No space left on device" in lines[0],
           f"stderr is not one disk-full summary line: {err!r}")
    expect(temp_files(s) == [], f"staged files left in temp/: {temp_files(s)}")
    st = states(t, s)
    expect(st["failed"] == 0, f"a disk-full run failed packages: {st}")
    # A rerun with space completes exactly.
    t.run(s, "migrate", code=0)
    expect(states(t, s)["verified"] == 6, f"rerun did not finish: {states(t, s)}")
    dest = os.path.join(t.work, "dest-" + os.path.basename(s))
    os.makedirs(dest)
    for i in range(6):
        check_materialize(t, s, f"pkg{i:02d}", dest)
    return st


@test
def enospc_on_write_stops_cleans_and_keeps_finished_packages(t):
    if not seams_or_skip(t):
        return
    # Every write fails from the 40th on: the run stops taking packages and removes what it staged. A
    # finished package is recorded only once its manifest is in packages/, which takes a few small
    # writes: where not even those succeed, it stays pending (never failed, never half recorded).
    s = seam_store(t, "seam-write")
    code, _, err = t.run(s, "-j", "2", "migrate", env={"CASMIG_FAULT": "write@40+=ENOSPC"})
    expect(code == 1, f"migrate with ENOSPC from the 40th write exited {code}, expected 1\n{err}")
    st = check_after_fault(t, s, err)
    expect(st["verified"] + st["pending"] == 6, f"packages neither verified nor pending: {st}")
    # A single failed write (space came back): the finished packages are kept, and a rerun completes.
    s = seam_store(t, "seam-write-once")
    code, _, err = t.run(s, "-j", "2", "migrate", env={"CASMIG_FAULT": "write@40=ENOSPC"})
    expect(code in (0, 1) and "disk full" in err, f"migrate with ENOSPC at the 40th write: {code} {err!r}")
    expect(states(t, s)["verified"] >= 1, f"no finished package was kept: {states(t, s)}")
    check_after_fault(t, s, err)


@test
def enospc_on_create_stops_and_cleans(t):
    if not seams_or_skip(t):
        return
    s = seam_store(t, "seam-open")
    code, _, err = t.run(s, "migrate", env={"CASMIG_FAULT": "open@5+=ENOSPC"})
    expect(code == 1, f"migrate with ENOSPC from the 5th create exited {code}, expected 1\n{err}")
    check_after_fault(t, s, err)


@test
def edquot_counts_as_disk_full(t):
    if not seams_or_skip(t):
        return
    s = seam_store(t, "seam-quota")
    code, _, err = t.run(s, "migrate", env={"CASMIG_FAULT": "write@3+=EDQUOT"})
    expect(code == 1 and "disk full" in err and "quota" in err.lower(), f"EDQUOT: {code} {err!r}")
    expect(temp_files(s) == [], f"staged files left in temp/: {temp_files(s)}")


@test
def transient_enospc_finishes_one_package_at_a_time(t):
    """A single failed write (space freed meanwhile): the rest of the run goes on one package at a time
    and migrates everything, so the run succeeds; it still says the disk was full."""
    if not seams_or_skip(t):
        return
    s = seam_store(t, "seam-once")
    code, _, err = t.run(s, "-j", "2", "migrate", env={"CASMIG_FAULT": "write@20=ENOSPC"})
    expect(code == 0 and "0 not started; nothing left to do" in err, f"transient ENOSPC: {code} {err!r}")
    expect(states(t, s)["verified"] == 6, f"not everything migrated: {states(t, s)}")
    expect(temp_files(s) == [], f"staged files left in temp/: {temp_files(s)}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-diskfull"))
