#!/usr/bin/env python3
"""temp/ is casmig's alone: a symlink there is refused and its target untouched; entries casmig did not
make survive every command and are reported; a running materialize keeps its temp files while locked
commands run; a killed run's staging files go at the next run; temp/ is empty after every completed run."""
import os
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

LOCKED = [["migrate"], ["verify"], ["verify", "--objects"], ["cutover"], ["cleanup"], ["cleanup", "--dry-run"],
          ["rollback"], ["remove", "pkg00"], ["gc"], ["gc", "--dry-run"]]


def temp_entries(s):
    return sorted(os.listdir(os.path.join(s, "temp")))


def tree_state(s):
    """Package trees, objects/ and packages/ (migration/lock records who tried; SQLite may add -wal/-shm)."""
    return {n: snapshot(os.path.join(s, n)) for n in sorted(os.listdir(s))
            if n not in ("migration", "temp") and not n.startswith("store.db")}


@test
def symlinked_temp_is_refused_by_every_command_and_its_target_untouched(t):
    s = t.store("tsym", 3)
    t.run(s, "migrate", code=0)
    outside = os.path.join(t.work, "tsym-outside")
    os.makedirs(os.path.join(outside, "sub"))
    put(outside, "canary", b"do not delete me\n")
    put(outside, "sub/tmp-casmig-1-1", b"looks like ours, is not\n")
    os.rmdir(os.path.join(s, "temp"))
    os.symlink(outside, os.path.join(s, "temp"))
    before_outside, before_store = snapshot(outside), tree_state(s)
    for args in LOCKED + [["materialize", "pkg01", os.path.join(t.work, "tsym-dest")]]:
        _, out, err = t.run(s, *args, code=3)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        expect(len(lines) == 1 and "temp" in lines[0] and "symlink" in lines[0],
               f"{args}: not one line naming the symlinked temp/: {err!r}")
        expect(snapshot(outside) == before_outside, f"{args} touched the target of the temp/ symlink")
        expect(tree_state(s) == before_store, f"{args} changed the store although it refused")
    expect(not os.path.exists(os.path.join(t.work, "tsym-dest")), "a refused materialize created DEST")
    # A file at temp is refused the same way.
    os.unlink(os.path.join(s, "temp"))
    with open(os.path.join(s, "temp"), "wb") as f:
        f.write(b"a file where temp/ should be\n")
    _, _, err = t.run(s, "migrate", code=3)
    expect("not a directory" in err, f"no reason given for a file at temp: {err!r}")


@test
def foreign_entries_in_temp_survive_every_command_and_are_reported_once(t):
    s = t.store("tforeign", 3)
    put(os.path.join(s, "temp"), "admin-notes.txt", b"mine\n")
    put(os.path.join(s, "temp"), "scratch/deep/file", b"also mine\n")
    mine = {n: snapshot(os.path.join(s, "temp", n)) if os.path.isdir(os.path.join(s, "temp", n)) else
            open(os.path.join(s, "temp", n), "rb").read() for n in ("admin-notes.txt", "scratch")}
    for args in (["migrate"], ["verify"], ["cutover"], ["cleanup"], ["gc"]):
        _, _, err = t.run(s, *args, code=0)
        warnings = [ln for ln in err.splitlines() if "warning" in ln]
        expect(len(warnings) == 1, f"{args}: expected one warning line, got {err!r}")
        expect("admin-notes.txt" in warnings[0] and "scratch" in warnings[0] and "left alone" in warnings[0],
               f"{args}: the warning does not name the foreign entries: {warnings[0]!r}")
        expect(temp_entries(s) == ["admin-notes.txt", "scratch"], f"{args}: temp/ now holds {temp_entries(s)}")
        expect(open(os.path.join(s, "temp/admin-notes.txt"), "rb").read() == mine["admin-notes.txt"], "file changed")
        expect(snapshot(os.path.join(s, "temp/scratch")) == mine["scratch"], "directory changed")


@test
def killed_migrate_leaves_staged_files_the_next_run_removes(t):
    if not harness_seams(t):
        print("  (skipped: casmig built without test seams)")
        return
    s = t.store("tkill", 4)
    code, _, _ = t.run(s, "migrate", env={"CASMIG_CRASH_AT": "publish.rename"})
    expect(code != 0, "migrate was not killed at publish.rename")
    staged = [f for _, _, fs in os.walk(os.path.join(s, "temp")) for f in fs if f.startswith("tmp-casmig-")]
    expect(staged, "the killed run left no staged object (the crash point moved?)")
    t.run(s, "migrate", code=0)
    expect(temp_entries(s) == [], f"temp/ after the rerun: {temp_entries(s)}")
    # Empty after every completed run.
    for args in (["verify", "--objects"], ["cutover"], ["materialize", "pkg01", os.path.join(t.work, "tkill-m")],
                 ["materialize", "--link", "hardlink", "pkg02", os.path.join(t.work, "tkill-h")], ["cleanup"],
                 ["rollback"], ["gc"]):
        t.run(s, *args, code=0)
        expect(temp_entries(s) == [], f"temp/ after {args}: {temp_entries(s)}")


@test
def a_sweep_that_fails_halfway_leaves_a_directory_the_next_sweep_removes(t):
    s = t.store("thalf", 4)
    code, _, _ = t.run(s, "migrate", env={"CASMIG_CRASH_AT": "publish.rename"})
    if code == 0:
        print("  (skipped: casmig built without test seams)")
        return
    (left,) = temp_entries(s)
    expect(len([f for _, _, fs in os.walk(os.path.join(s, "temp")) for f in fs]) >= 3, "too few staged files")
    # The next run's sweep fails at its second unlink: the lock file must still be there (it goes last),
    # or the leftover would look foreign for ever.
    code, _, err = t.run(s, "migrate", env={"CASMIG_FAULT": "unlink@2=EIO"})
    expect(code == 1 and len(err.strip().splitlines()) == 1, f"faulted sweep: exit {code}, {err!r}")
    expect(temp_entries(s) == [left] and "lock" in os.listdir(os.path.join(s, "temp", left)),
           f"a half-swept staging directory lost its lock: {os.listdir(os.path.join(s, 'temp', left))}")
    _, _, err = t.run(s, "migrate", code=0)
    expect("warning" not in err, f"the half-swept directory was reported as foreign: {err!r}")
    expect(temp_entries(s) == [], f"temp/ after the rerun: {temp_entries(s)}")


harness_seams = harness.seams


@test
def locked_commands_keep_a_running_materialize_s_temp_files(t):
    def extra(root):
        # Executable files link to read-only variants (".m555") that materialize builds in temp/ one by
        # one (write, fsync, link): thousands of them keep it busy for a few seconds.
        for k in range(1200):
            put(os.path.join(root, "big"), f"bin/{k // 100}/tool{k}", os.urandom(64) + str(k).encode(), 0o755)
    s = t.store("tmat", 2, extra)
    t.run(s, "migrate", code=0)
    dest = os.path.join(t.work, "tmat-dest")
    p = subprocess.Popen([t.casmig, "--store", s, "materialize", "--link", "hardlink", "big", dest],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not temp_entries(s):
        time.sleep(0.005)
    expect(p.poll() is None, "materialize finished before its staging directory was seen (make the package bigger)")
    sweeps = 0
    while p.poll() is None:
        # Each of these takes the store lock and sweeps temp/ (gc then finds materialize's gc.lock: exit 4).
        code, _, err = t.run(s, "gc", "--dry-run")
        expect(code in (0, 4), f"gc --dry-run exited {code}: {err}")
        t.run(s, "verify", "pkg00", code=0)
        sweeps += 1
    out, err = p.communicate()
    expect(p.returncode == 0, f"materialize died while locked commands ran ({sweeps} sweeps): {err.decode()!r}")
    expect(sweeps >= 3, f"only {sweeps} sweeps ran during materialize (make the package bigger)")
    got, want = snapshot(dest), snapshot(os.path.join(s, "big"))
    strip = lambda snap: {k: (v[0], v[1] & 0o7555 if v[1] is not None else None, v[2], v[3]) for k, v in snap.items()}
    expect(strip(got) == strip(want), "hard-link materialize is not exact")
    expect(temp_entries(s) == [], f"temp/ after materialize: {temp_entries(s)}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-temp"))
