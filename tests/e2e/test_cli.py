#!/usr/bin/env python3
"""End-to-end tests: every casmig command, run as the real binary against throw-away stores.

Usage: test_cli.py --casmig PATH [--only NAME ...] [--keep]
"""
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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import T, test, put, snapshot, kill_at, expect, seams  # noqa: E402,F401


# ------------------------------------------------------------------ the tests

@test
def help_and_usage_errors(t):
    p = subprocess.run([t.casmig, "--help"], capture_output=True, text=True)
    expect(p.returncode == 0, "--help failed")
    for c in ["plan", "migrate", "status", "verify", "cutover", "cleanup", "rollback", "materialize", "remove", "gc"]:
        expect(c in p.stdout, f"--help lacks {c}")
    p = subprocess.run([t.casmig, "frobnicate"], capture_output=True, text=True)
    expect(p.returncode == 2 and p.stderr.count("\n") == 1, f"unknown command: {p.returncode} {p.stderr!r}")
    p = subprocess.run([t.casmig, "--store", "/nonexistent/store", "status"], capture_output=True, text=True)
    expect(p.returncode == 2 and "does not exist" in p.stderr, f"missing store: {p.returncode} {p.stderr!r}")
    p = subprocess.run([t.casmig, "--store", "/etc/passwd", "status"], capture_output=True, text=True)
    expect(p.returncode == 2 and "not a directory" in p.stderr, f"file as store: {p.returncode} {p.stderr!r}")
    s = t.store("usage", 1)
    code, _, err = t.run(s, "migrate", "--time-budget", "soon")
    expect(code == 2 and "duration" in err, f"bad duration: {code} {err!r}")
    code, _, err = t.run(s, "migrate", "--io-limit", "fast")
    expect(code == 2, f"bad io-limit: {code}")
    code, _, err = t.run(s, "migrate", "no-such-pkg")
    expect(code == 2 and "no-such-pkg" in err, f"unknown package: {code} {err!r}")
    expect("Traceback" not in err and "terminate" not in err, "a crash trace on stderr")


@test
def plan_then_migrate_then_status(t):
    s = t.store("basic", 5)
    plan = t.json(s, "plan")
    expect(plan["packages"] == 5 and plan["files"] == 15, f"plan: {plan}")
    expect(not os.path.exists(os.path.join(s, "store.db")), "plan wrote a catalog")
    _, out, _ = t.run(s, "plan", code=0)
    expect("5 packages" in out, f"human plan: {out!r}")
    code, out, _ = t.run(s, "migrate")
    expect(code == 0 and "5 verified" in out, f"migrate: {code} {out!r}")
    st = t.json(s, "status")
    expect(st["packages"]["verified"] == 5 and st["mode"] == "dual", f"status: {st}")
    expect(st["objects"] == 7, f"objects: {st['objects']}")  # LICENSE, empty, 5 tools
    expect(st["saved_bytes"] == st["logical_bytes"] - st["stored_bytes"], "saved_bytes")
    _, out, _ = t.run(s, "status", code=0)
    expect("verified" in out and "journal" in out, f"human status: {out!r}")
    # global options after the command
    st2 = json.loads(t.run(s, "status", "--json", code=0)[1])
    expect(st2["packages"] == st["packages"], "--json after status differs")
    expect(t.json(s, "plan")["packages"] == 0, "plan after migrate still has work")


@test
def migrate_bounds_and_retry(t):
    s = t.store("bounds", 6)
    t.run(s, "migrate", "pkg05", code=0)
    t.run(s, "migrate", "--limit", "2", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == 3, "limit")
    out = t.json(s, "migrate", "--time-budget", "0s")
    expect(out["migrated"] == 0 and out["stopped_by_time_budget"], f"time budget: {out}")
    t0 = time.time()
    t.run(s, "migrate", "--io-limit", "4K", "--limit", "1", code=0)  # ~3 KiB tool + 300 B license
    expect(time.time() - t0 < 30, "io-limit took too long")
    t.run(s, "migrate", "--no-verify", code=0)
    st = t.json(s, "status")
    expect(st["packages"]["migrated"] == 2 and st["packages"]["pending"] == 0, f"--no-verify: {st['packages']}")
    t.run(s, "verify", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == 6, "verify did not mark migrated packages verified")


@test
def many_threads_under_a_low_open_file_limit(t):
    # Read-ahead keeps files open; it must shrink to the open-file limit, never fail a package.
    def extra(root):
        for i in range(300):
            put(os.path.join(root, "pkg00"), f"many/f{i:03d}", f"file {i}\n".encode() * (i + 1))
    s = t.store("fdlimit", 3, extra)
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
    for args in (["-j", "16", "migrate"], ["-j", "16", "verify"], ["-j", "16", "verify", "--objects"]):
        p = subprocess.run([t.casmig, "--store", s] + args, capture_output=True, text=True, preexec_fn=limit,
                           timeout=300)
        expect(p.returncode == 0, f"{' '.join(args)} under 96 open files: exit {p.returncode}: {p.stderr[-400:]}")
    expect(t.json(s, "status")["packages"]["verified"] == 3, "not every package verified")


@test
def special_and_changed_files_fail_alone(t):
    def extra(root):
        put(os.path.join(root, "zz-fifo"), "ok", b"fine")
        os.mkfifo(os.path.join(root, "zz-fifo", "pipe"))
    s = t.store("hostile", 3, extra)
    code, out, err = t.run(s, "migrate")
    expect(code == 1, f"migrate exit {code}")
    lines = [l for l in err.splitlines() if "zz-fifo" in l]
    expect(len(lines) == 1 and "pipe" in lines[0] and "fifo" in lines[0], f"error line: {err!r}")
    st = t.json(s, "status")
    expect(st["packages"]["failed"] == 1 and st["packages"]["verified"] == 3, f"{st['packages']}")
    code, out, _ = t.run(s, "status")
    expect("pipe" in out, "status does not show why the package failed")
    os.unlink(os.path.join(s, "zz-fifo", "pipe"))
    t.run(s, "migrate", code=0)  # failed packages wait for --retry-failed
    expect(t.json(s, "status")["packages"]["failed"] == 1, "failed package retried without --retry-failed")
    t.run(s, "migrate", "--retry-failed", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == 4, "retry")


@test
def unreadable_file_fails_its_package_when_not_root(t):
    import shutil as _sh
    if os.geteuid() != 0 or not _sh.which("setpriv"):
        print("  (skipped: needs root and setpriv to run casmig as nobody)")
        return
    s = t.store("unreadable", 2)
    os.chmod(t.work, 0o755)  # nobody must reach the store
    put(os.path.join(s, "pkg01"), "locked", b"secret", 0o000)
    subprocess.run(["chown", "-R", "nobody:nogroup", s], check=True)
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", t.casmig, "--store", s]
    p = subprocess.run(cmd + ["migrate"], capture_output=True, text=True)
    expect(p.returncode == 1, f"migrate as nobody exited {p.returncode}: {p.stderr!r}")
    lines = p.stderr.strip().splitlines()
    expect(len(lines) == 1 and "pkg01" in lines[0] and "locked" in lines[0] and "Permission denied" in lines[0],
           f"error line: {p.stderr!r}")
    p = subprocess.run(cmd + ["--json", "status"], capture_output=True, text=True)
    st = json.loads(p.stdout)
    expect(st["packages"]["failed"] == 1 and st["packages"]["verified"] == 1, f"{st['packages']}")


@test
def verify_finds_drift_and_corruption(t):
    s = t.store("verify", 3)
    t.run(s, "migrate", code=0)
    tool = os.path.join(s, "pkg01", "bin", "tool1")
    with open(tool, "ab") as f:
        f.write(b"tampered")
    code, out, err = t.run(s, "verify", "pkg01")
    expect(code == 1 and "bin/tool1" in err and "content differs" in err, f"content drift: {err!r}")
    expect(t.json(s, "status")["packages"]["failed"] == 1, "drifted package not marked failed")
    t.run(s, "cutover", code=3)
    t.run(s, "migrate", "--retry-failed", code=0)
    code, out, err = t.run(s, "verify", "--sample", "2")
    expect(code == 0 and "2 packages" in out, f"sample: {out!r}")
    obj = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(s, "objects")) for f in fs)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"X")
    code, out, err = t.run(s, "verify", "--objects")
    expect(code == 1 and os.path.basename(obj)[:10] in err, f"corrupt object: {err!r}")
    expect(not os.path.exists(obj), "corrupt object left in place")
    # the affected package is failed and a retry rewrites the object from its legacy tree
    t.run(s, "migrate", "--retry-failed", code=0)
    t.run(s, "verify", "--objects", code=0)


EDIT_SAME_SIZE_KEEP_MTIME = ("python3 -c \"import os,sys; p=sys.argv[1]; st=os.stat(p); f=open(p,'r+b'); b=f.read(1); "
                             "f.seek(0); f.write(bytes([b[0]^1])); f.close(); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))\" ")


def regular_files(s):
    return sum(1 for d, _, fs in os.walk(s) for f in fs if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))


LOCAL_FS_MAGIC = {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1}  # ext*, xfs, btrfs, tmpfs, f2fs, zfs


def local_fs(path):
    """True if path is on a filesystem where migrate's verify may prove files by identity."""
    out = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True, text=True, check=True).stdout
    return int(out.strip(), 16) in LOCAL_FS_MAGIC


@test
def migrate_verify_proves_by_identity_and_reads_what_changed(t):
    """migrate's verify takes a file's content as proven when its inode, size, mtime and ctime are still
    those ingest saw while hashing it; a file changed since, or changed shortly before the run began
    (the racy window), is read and hashed again."""
    s = t.store("identity-fresh", 3)
    files = regular_files(s)
    r = t.json(s, "migrate")
    # Every file was written a moment ago, inside the racy window: each one is read again.
    expect(r["verify_files_read"] == files and r["verify_files_by_identity"] == 0,
           f"fresh files must be re-read: {files} files, {r}")
    if not seams(t):
        return
    # The window opened (test seam): files are proven by identity, except one edited between the commit
    # and the verify — same size, mtime put back, so only its ctime tells — which is read and fails.
    s = t.store("identity-edit", 3)
    # On NFS, FUSE, overlayfs ... nothing is proven by identity: every file is read.
    local = local_fs(s)
    tool = os.path.join(s, "pkg01", "bin", "tool1")
    env = {"CASMIG_RACY_WINDOW_MS": "-600000", "CASMIG_HOOK_AT": "migrate.committed",
           "CASMIG_HOOK_CMD": EDIT_SAME_SIZE_KEEP_MTIME + tool}
    code, out, err = t.run(s, "--json", "migrate", env=env)
    r = json.loads(out)
    expect(code == 1 and "bin/tool1" in err and "content differs" in err, f"edit after ingest not found: {code} {err!r}")
    want = (1, files - 1) if local else (files, 0)
    expect((r["verify_files_read"], r["verify_files_by_identity"]) == want,
           f"read/proven by identity should be {want} (local filesystem: {local}): {files} files, {r}")
    st = t.json(s, "status")["packages"]
    expect(st["failed"] == 1 and st["verified"] == 2, f"{st}")
    t.run(s, "migrate", "--retry-failed", code=0)
    t.run(s, "verify", code=0)
    # A file proven by identity still holds the catalog to the digest ingest computed: a manifest row
    # changed after the commit (another object of the same size) fails the package.
    s = t.store("identity-catalog", 3)
    with open(os.path.join(s, "pkg02", "bin", "tool2"), "wb") as f:
        f.write(os.urandom(3001))  # tool1's size
    swap = ("python3 -c \"import sqlite3,sys; db=sqlite3.connect(sys.argv[1]); "
            "d=db.execute(\\\"SELECT e.digest FROM entries e JOIN packages p ON p.id=e.package WHERE p.name=CAST('pkg01' AS BLOB) AND e.path=CAST('bin/tool1' AS BLOB)\\\").fetchone()[0]; "
            "db.execute(\\\"UPDATE entries SET digest=? WHERE path=CAST('bin/tool2' AS BLOB)\\\", (d,)); db.commit()\" ")
    env = {"CASMIG_RACY_WINDOW_MS": "-600000", "CASMIG_HOOK_AT": "migrate.committed",
           "CASMIG_HOOK_CMD": swap + os.path.join(s, "store.db")}
    code, out, err = t.run(s, "--json", "migrate", env=env)
    r = json.loads(out)
    expect(code == 1 and "pkg02" in err and "bin/tool2" in err and "content differs" in err,
           f"a manifest that no longer holds ingest's digest must fail: {code} {err!r}")
    expect(r["verify_files_read"] == (0 if local else files), f"nothing changed on disk, nothing to read again: {r}")
    # Where a file's ctime is not the kernel's own fresh answer, or not on the clock that was read, or the
    # clock went back during the run, nothing is proven by identity (CASMIG_IDENTITY_SEAM fakes each).
    for seam in ("remote-fs", "other-dev", "temp-other-dev", "clock-back"):
        s = t.store(f"identity-{seam}", 3)
        r = t.json(s, "migrate", env={"CASMIG_RACY_WINDOW_MS": "-600000", "CASMIG_IDENTITY_SEAM": seam})
        expect((r["verify_files_read"], r["verify_files_by_identity"]) == (files, 0),
               f"{seam}: every file must be read again: {files} files, {r}")


@test
def verify_objects_only_checks_the_store_and_reads_no_legacy_tree(t):
    s = t.store("objects-only", 3)
    t.run(s, "migrate", code=0)
    # A legacy tree that drifted is not its business (no package is checked, none marked failed) ...
    with open(os.path.join(s, "pkg01", "bin", "tool1"), "r+b") as f:
        f.write(b"tampered")
    out = t.json(s, "verify", "--objects-only")
    expect(out["packages"] == 0 and out["objects"]["bad"] == 0 and out["objects"]["checked"] == t.json(s, "status")["objects"],
           f"objects-only on a sound store: {out}")
    expect(out["manifests"]["checked"] == 3, f"manifests re-hashed: {out}")
    expect(t.json(s, "status")["packages"]["failed"] == 0, "objects-only judged a legacy tree")
    # ... a corrupt object is, and a damaged manifest object too.
    obj = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(s, "objects")) for f in fs)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"X")
    code, out, err = t.run(s, "verify", "--objects-only")
    expect(code == 1 and os.path.basename(obj)[:10] in err and "tool1" not in err, f"corrupt object: {err!r}")
    expect("objects and 3 manifests re-hashed, 1 bad" in out, f"summary line: {out!r}")
    # It checks the whole store or nothing: package names and --sample are usage errors.
    t.run(s, "verify", "--objects-only", "pkg01", code=2)
    t.run(s, "verify", "--objects-only", "--sample", "1", code=2)


@test
def verify_and_cleanup_catch_a_retargeted_symlink(t):
    s = t.store("symlink-drift", 2)
    t.run(s, "migrate", code=0)
    t.run(s, "verify", code=0)
    t.run(s, "cutover", code=0)
    alias = os.path.join(s, "pkg01", "bin", "alias")
    st = os.lstat(alias)
    os.unlink(alias)
    os.symlink("tool0", alias)  # same length as the original target: only the target differs
    os.utime(alias, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    code, out, err = t.run(s, "verify", "pkg01")
    expect(code == 1 and "bin/alias" in err and "symlink target differs" in err, f"retargeted symlink: {err!r}")
    code, out, err = t.run(s, "cleanup")
    expect(code == 1 and "bin/alias" in err, f"cleanup must refuse the drifted tree: {err!r}")
    expect(os.readlink(alias) == "tool0", "cleanup deleted a tree whose symlink changed")


@test
def busy_lock_exit_4_and_status_still_answers(t):
    s = t.store("lock", 2)
    t.run(s, "migrate", code=0)
    with open(os.path.join(s, "migration", "lock"), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for cmd in (["migrate"], ["verify"], ["cutover"], ["cleanup"], ["rollback"], ["gc"], ["remove", "pkg00"]):
            code, _, err = t.run(s, *cmd)
            expect(code == 4 and "busy" in err, f"{cmd} under lock: {code} {err!r}")
        t0 = time.time()
        t.run(s, "status", code=0)
        t.run(s, "materialize", "pkg00", os.path.join(t.work, "lock-mat"), code=0)
        expect(time.time() - t0 < 5, "status or materialize blocked on the lock")


@test
def full_lifecycle_exact_with_owners_setuid_hardlinks(t):
    def extra(root):
        p = os.path.join(root, "pkg00")
        put(p, "bin/suid", b"suid", 0o4755)
        put(p, "private", b"secret", 0o600)
        os.link(os.path.join(p, "LICENSE"), os.path.join(p, "LICENSE.link"))
        os.chmod(os.path.join(p, "share"), 0o555)
        if os.geteuid() == 0:
            os.chown(os.path.join(p, "private"), 1234, 4321)
            os.chown(os.path.join(p, "bin", "alias"), 1234, 4321, follow_symlinks=False)
    s = t.store("life", 4, extra)
    before = {p: snapshot(os.path.join(s, p), owners=os.geteuid() == 0) for p in sorted(os.listdir(s))}
    t.run(s, "migrate", code=0)
    t.run(s, "cleanup", code=3)
    out = t.json(s, "cutover")
    expect(out["marked"] == 4, f"cutover: {out}")
    t.run(s, "cutover", code=3)
    dry = t.json(s, "cleanup", "--dry-run")
    expect(dry["trees"] == 4 and dry["freed_bytes"] > 0 and os.path.isdir(os.path.join(s, "pkg00")), f"dry: {dry}")
    out = t.json(s, "cleanup")
    expect(out["trees"] == 4 and not os.path.exists(os.path.join(s, "pkg00")), f"cleanup: {out}")
    expect(t.json(s, "status")["legacy_trees"]["removed"] == 4, "removed count")
    t.run(s, "verify", code=0)
    t.run(s, "rollback", code=0)
    after = {p: snapshot(os.path.join(s, p), owners=os.geteuid() == 0) for p in before}
    expect(after == before, f"rollback not exact: {[p for p in before if before[p] != after[p]]}")
    st = os.stat(os.path.join(s, "pkg00", "LICENSE"))
    expect(st.st_nlink == 2, "hard link not restored")
    expect(t.json(s, "status")["mode"] == "legacy", "mode after rollback")
    t.run(s, "rollback", code=0)  # idempotent
    out = t.json(s, "migrate")
    expect(out["verified"] == 4 and out["new_objects"] == 0, f"re-migrate after rollback: {out}")


@test
def extended_attributes_survive_cleanup_and_rollback(t):
    def extra(root):
        p = os.path.join(root, "pkg00")
        os.setxattr(os.path.join(p, "LICENSE"), "user.origin", b"upstream")
        os.setxattr(os.path.join(p, "share"), "user.note", b"dir attr")
    try:
        s = t.store("xattr", 2, extra)
    except OSError:
        print("  (skipped: the filesystem has no user xattrs)")
        return
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    t.run(s, "rollback", code=0)
    p = os.path.join(s, "pkg00")
    expect(os.getxattr(os.path.join(p, "LICENSE"), "user.origin") == b"upstream", "file xattr lost")
    expect(os.getxattr(os.path.join(p, "share"), "user.note") == b"dir attr", "dir xattr lost")
    t.run(s, "migrate", code=0)
    os.setxattr(os.path.join(p, "LICENSE"), "user.origin", b"changed")
    code, _, err = t.run(s, "verify", "pkg00")
    expect(code == 1 and "LICENSE" in err and "extended attributes" in err, f"xattr drift: {code} {err!r}")


@test
def materialize_link_modes(t):
    s = t.store("mat", 2, lambda r: put(os.path.join(r, "pkg00"), "bin/suid", b"x", 0o4755))
    t.run(s, "migrate", code=0)
    ref = snapshot(os.path.join(s, "pkg00"))
    for mode in ["copy", "reflink", "hardlink"]:
        dest = os.path.join(t.work, f"mat-{mode}")
        t.run(s, "materialize", "pkg00", dest, "--link", mode, code=0)
        got = snapshot(dest)
        expect(set(got) == set(ref), f"{mode}: paths differ")
        for k in ref:
            if mode == "hardlink":
                expect(got[k][:4:2] == ref[k][:4:2], f"{mode}: {k} differs")
            else:
                expect(got[k] == ref[k], f"{mode}: {k} differs {got[k]} {ref[k]}")
    expect(os.stat(os.path.join(t.work, "mat-hardlink", "bin", "suid")).st_nlink == 1, "setuid file was hard-linked")
    code, _, err = t.run(s, "materialize", "pkg00", os.path.join(t.work, "mat-copy"))
    expect(code == 2 and "not empty" in err, f"non-empty dest: {code} {err!r}")
    code, _, err = t.run(s, "materialize", "nope", os.path.join(t.work, "x"))
    expect(code == 2, f"unknown package: {code}")


@test
def materialize_refuses_crafted_symlink_manifest(t):
    s = t.store("crafted", 1)
    t.run(s, "migrate", code=0)
    victim = os.path.join(t.work, "victim")
    os.makedirs(victim)
    db = sqlite3.connect(os.path.join(s, "store.db"))
    pid = db.execute("SELECT id FROM packages WHERE name = ?", (b"pkg00",)).fetchone()[0]
    digest = db.execute("SELECT digest FROM entries WHERE package=? AND type=1 LIMIT 1", (pid,)).fetchone()[0]
    db.execute("INSERT INTO entries(package, path, type, mode, size, digest, target, mtime_ns) VALUES (?,?,3,511,0,NULL,?,0)",
               (pid, b"evil", os.fsencode(victim)))
    db.execute("INSERT INTO entries(package, path, type, mode, size, digest, target, mtime_ns) VALUES (?,?,1,420,300,?,NULL,0)",
               (pid, b"evil/planted", digest))
    db.commit()
    db.close()
    code, _, err = t.run(s, "materialize", "pkg00", os.path.join(t.work, "crafted-out"))
    expect(code != 0 and "evil" in err, f"crafted manifest: {code} {err!r}")
    expect(os.listdir(victim) == [], "materialize wrote through a symlink")


@test
def remove_and_gc(t):
    s = t.store("gc", 3)
    t.run(s, "migrate", code=0)
    expect(t.json(s, "gc", "--dry-run")["removed_objects"] == 0, "gc on a clean store")
    t.run(s, "remove", "pkg01", code=0)
    expect(not os.path.exists(os.path.join(s, "pkg01")), "remove left the tree")
    out = t.json(s, "gc", "--dry-run")
    expect(out["removed_objects"] == 1 and out["freed_bytes"] == 3001, f"gc dry: {out}")
    out = t.json(s, "gc")
    expect(out["removed_objects"] == 1, f"gc: {out}")
    expect(t.json(s, "status")["objects"] == 4, "objects after gc")
    t.run(s, "verify", "--objects", code=0)
    code, _, err = t.run(s, "remove", "pkg01")
    expect(code == 2, "removing an unknown package")


@test
def gc_deletes_exactly_the_unreferenced_objects_in_every_shard(t):
    """gc decides per fan-out directory (a sort-merge, memory independent of the store): 60 packages'
    contents spread over most shards; removing every other package must delete exactly the contents
    only those held, their .zst twins and stray files included, and keep every other object."""
    import shutil

    def extra(root):
        for i in range(60):
            for k in range(8):
                put(os.path.join(root, f"p{i:02d}"), f"f{k}", f"package {i} file {k}\n".encode() * (k + 1))
            put(os.path.join(root, f"p{i:02d}"), "shared", b"in every package\n")
    s = t.store("gc-shards", 0, extra)
    t.run(s, "migrate", code=0)
    objs = lambda: {os.path.relpath(os.path.join(d, f), os.path.join(s, "objects"))
                    for d, _, fs in os.walk(os.path.join(s, "objects")) for f in fs}
    before = objs()
    expect(len({o[:2] for o in before}) > 100, f"the store should span many shards: {len(before)} objects")
    for i in range(0, 60, 2):
        t.run(s, "remove", f"p{i:02d}", code=0)
    # What the removed packages alone held: from the catalog of a copy before gc.
    db = sqlite3.connect(os.path.join(s, "store.db"))
    live = {bytes(r[0]).hex() for r in db.execute("SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL")}
    rows = {bytes(r[0]).hex() for r in db.execute("SELECT digest FROM objects")}
    db.close()
    dead = {o for o in before if o[:2] + o[3:67] not in live}
    expect(len(dead) == 30 * 8, f"expected the removed packages' 240 own contents, found {len(dead)}")
    # A stray file in a shard of its own (no row) and a .zst twin of a dead object: both go; a file not
    # named like an object stays.
    victim = sorted(dead)[0]
    twin = os.path.join(s, "objects", victim + ".zst")
    shutil.copy(os.path.join(s, "objects", victim), twin)
    gone_file = os.path.join(s, "objects", sorted(dead)[1])  # a dead object's row whose file is already gone
    os.chmod(os.path.dirname(gone_file), 0o755)
    os.remove(gone_file)
    stray_hex = "ff" * 32
    os.makedirs(os.path.join(s, "objects", "ff"), exist_ok=True)
    put(os.path.join(s, "objects", "ff"), stray_hex[2:], b"stray")
    put(os.path.join(s, "objects", "ff"), "not-an-object", b"keep me")
    mid = objs()
    dry = t.json(s, "gc", "--dry-run")
    expect(dry["removed_objects"] == len(dead) + 1, f"gc --dry-run: {dry} (expected {len(dead) + 1})")
    expect(objs() == mid, "gc --dry-run deleted something")
    out = t.json(s, "gc")
    expect(out["removed_objects"] == len(dead) + 1 and out["freed_bytes"] == dry["freed_bytes"], f"gc: {out} vs {dry}")
    after = objs()
    expect(after == (before - dead) | {"ff/not-an-object"}, f"gc deleted the wrong files: kept dead "
           f"{sorted(after & dead)[:3]}, deleted live {sorted((before - dead) - after)[:3]}")
    db = sqlite3.connect(os.path.join(s, "store.db"))
    rows_after = {bytes(r[0]).hex() for r in db.execute("SELECT digest FROM objects")}
    db.close()
    expect(rows_after == {r for r in rows if r in live}, "catalog rows of dead objects kept, or live rows dropped")
    os.remove(os.path.join(s, "objects", "ff", "not-an-object"))  # verify --objects would quarantine it
    t.run(s, "verify", "--objects", code=0)
    for i in range(1, 60, 2):
        t.run(s, "verify", f"p{i:02d}", code=0)
    expect(t.json(s, "gc")["removed_objects"] == 0, "a second gc found more")


@test
def kill9_during_rollback_then_rerun(t):
    def extra(root):
        for i in range(30):
            put(os.path.join(root, f"pkg{i:02d}"), "bulk.bin", os.urandom(1 << 20))
    s = t.store("k9rb", 30, extra)
    before = {p: snapshot(os.path.join(s, p)) for p in sorted(os.listdir(s))}
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    def whole(delay):  # whatever is under a package name is whole
        for name in os.listdir(s):
            if name in before:
                expect(snapshot(os.path.join(s, name)) == before[name], f"half tree {name} after kill at {delay}s")
    kill_at(t, s, "rollback", [0.02, 0.1, 0.3], whole)
    t.run(s, "rollback", code=0)
    after = {p: snapshot(os.path.join(s, p)) for p in before}
    expect(after == before, "rollback after kills not exact")
    expect(os.listdir(os.path.join(s, "temp")) == [], "temp/ not empty")


@test
def kill9_during_cleanup_then_rerun(t):
    def extra(root):
        for i in range(30):
            put(os.path.join(root, f"pkg{i:02d}"), "many/" + "/".join(["d"] * 5) + "/f", os.urandom(50_000))
            for k in range(40):
                put(os.path.join(root, f"pkg{i:02d}"), f"small/{k}", f"{i}-{k}".encode())
    s = t.store("k9cl", 30, extra)
    before = {p: snapshot(os.path.join(s, p)) for p in sorted(os.listdir(s))}
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    def whole(delay):  # a tree under a package name is whole: cleanup moves it aside first
        for name in os.listdir(s):
            if name in before:
                expect(snapshot(os.path.join(s, name)) == before[name], f"half-deleted {name} after kill at {delay}s")
    kill_at(t, s, "cleanup", [0.01, 0.05, 0.15], whole)
    out = t.json(s, "cleanup")
    expect(not any(n in before for n in os.listdir(s)), "rerun left trees")
    expect(os.listdir(os.path.join(s, "temp")) == [], "temp/ not empty after cleanup")
    expect(t.json(s, "status")["legacy_trees"]["removed"] == 30, "not all recorded removed")
    t.run(s, "rollback", code=0)
    expect({p: snapshot(os.path.join(s, p)) for p in before} == before, "rollback after killed cleanups not exact")


@test
def progress_bar_goes_to_stderr(t):
    s = t.store("progress", 3)
    code, out, err = t.run(s, "--progress", "always", "migrate", code=0)
    # Not a terminal: plain lines (a summary per phase; periodic lines in long runs: e2e-progress).
    expect("casmig: migrate done: 3 pkgs" in err and "\r" not in err, f"no progress lines: {err!r}")
    expect("\r" not in out and "done:" not in out, "progress on stdout")
    code, out, err = t.run(s, "-q", "verify", code=0)
    expect(out == "", f"-q printed {out!r}")



if __name__ == "__main__":
    sys.exit(harness.main("e2e"))
