#!/usr/bin/env python3
"""End-to-end tests of cleanup, rollback, discovery and the package state machine: prove before delete,
recover across commands, trust nothing at a package's name (issue 7, found cases 1, 2, 3, 8)."""
import os
import shutil
import sqlite3
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402


def pristine(t, s):
    """Snapshot of every package tree (with owners), taken before anything touches the store."""
    return {p: snapshot(os.path.join(s, p), owners=True) for p in sorted(os.listdir(s))
            if not p.startswith(".") and os.path.isdir(os.path.join(s, p))}


def all_exact(t, s, before, where="legacy"):
    """Every package of `before` is exactly back: as a legacy tree, or materialized from the CAS."""
    for p, snap in before.items():
        if where == "legacy":
            got = snapshot(os.path.join(s, p), owners=True) if os.path.isdir(os.path.join(s, p)) else None
        else:
            dest = os.path.join(t.work, f"m-{os.path.basename(s)}-{p}-{len(os.listdir(t.work))}")
            t.run(s, "materialize", p, dest, code=0)
            got = snapshot(dest, owners=True)
        expect(got == snap, f"package {p} is not exact ({where}): "
                            f"{sorted(set((got or {}).items()) ^ set(snap.items()))[:3]}")


def object_of(s, pkg, path):
    """Path under objects/ of the object a package's file refers to (from the catalog)."""
    db = sqlite3.connect(os.path.join(s, "store.db"))
    (digest,) = db.execute("SELECT hex(e.digest) FROM entries e JOIN packages p ON p.id=e.package "
                           "WHERE p.name=CAST(? AS BLOB) AND e.path=CAST(? AS BLOB)", (pkg, path)).fetchone()
    db.close()
    h = digest.lower()
    return os.path.join(s, "objects", h[:2], h[2:])


def flip_a_byte(obj):
    """Corrupts an object in place, same size, mode put back."""
    os.chmod(obj, 0o644)
    data = bytearray(open(obj, "rb").read())
    data[len(data) // 2] ^= 1
    with open(obj, "wb") as f:
        f.write(data)
    os.chmod(obj, 0o444)


def crash(t, s, command, point, mode="kill", *args):
    env = {"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode, "CASMIG_CRASH_ROOT": s}
    code, out, err = t.run(s, command, *args, env=env)
    expect(code in (-9, 137), f"{command} did not crash at {point}: exit {code}\n{err}")


@test
def cleanup_stopped_after_move_aside_then_rollback_loses_nothing(t):
    """Found case 1: cleanup killed after it moved a tree to temp/ but before recording it; then rollback,
    migrate and gc. Nothing may be lost."""
    s = t.store("case1", 4)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    crash(t, s, "cleanup", "cleanup.moved-aside@2")
    t.run(s, "rollback", code=0)
    all_exact(t, s, before)
    t.run(s, "migrate", code=0)
    t.run(s, "gc", code=0)
    all_exact(t, s, before, "cas")
    expect(os.listdir(os.path.join(s, "temp")) == [], f"temp/ not empty: {os.listdir(os.path.join(s, 'temp'))}")


@test
def cleanup_stopped_after_record_then_any_command_finishes_it(t):
    """A cleanup stopped after recording trees removed but before deleting them: the next command (here
    verify) proves the CAS again and finishes; every package materializes exactly."""
    s = t.store("recorded", 3)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    crash(t, s, "cleanup", "cleanup.recorded")
    expect(any(n.startswith("trash-") for n in os.listdir(os.path.join(s, "temp"))), "no moved-aside tree left")
    t.run(s, "verify", code=0)
    expect(os.listdir(os.path.join(s, "temp")) == [], "verify did not finish the deletion")
    all_exact(t, s, before, "cas")
    st = t.json(s, "status")
    expect(st["legacy_trees"]["removed"] == 3, f"trees: {st['legacy_trees']}")


@test
def rollback_moves_foreign_things_aside_and_rebuilds(t):
    """Found case 2: an empty directory or a stray file at a removed package's name is not taken for the
    package: it is moved aside (never deleted), the package is rebuilt exactly."""
    s = t.store("case2", 3)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    os.mkdir(os.path.join(s, "pkg00"))
    with open(os.path.join(s, "pkg01"), "w") as f:
        f.write("stray file an admin left")
    code, out, err = t.run(s, "rollback", code=0)
    expect("pkg00" in err and "pkg01" in err and "aside" in err, f"foreign things not reported: {err}")
    all_exact(t, s, before)
    aside = os.listdir(os.path.join(s, "migration", "aside"))
    expect(len(aside) == 2, f"aside: {aside}")
    stray = [a for a in aside if a.startswith("pkg01")][0]
    with open(os.path.join(s, "migration", "aside", stray)) as f:
        expect(f.read() == "stray file an admin left", "stray file content lost")
    # and a second rollback changes nothing
    t.run(s, "rollback", code=0)
    all_exact(t, s, before)


@test
def cleanup_keeps_trees_that_changed_after_cutover(t):
    """Found case 3: a same-size edit with the mtime put back, a size change, an added file: each tree is
    kept and reported (exit 1); the unchanged trees are cleaned."""
    s = t.store("case3", 5)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    lic = os.path.join(s, "pkg00", "LICENSE")
    st = os.stat(lic)
    data = bytearray(open(lic, "rb").read())
    data[0] ^= 0x20
    with open(lic, "wb") as f:
        f.write(data)
    os.utime(lic, ns=(st.st_atime_ns, st.st_mtime_ns))
    with open(os.path.join(s, "pkg01", "LICENSE"), "ab") as f:
        f.write(b"more")
    put(os.path.join(s, "pkg02"), "share/new-file", b"added after cutover")
    edited = {p: snapshot(os.path.join(s, p)) for p in ("pkg00", "pkg01", "pkg02")}
    code, out, err = t.run(s, "cleanup", code=1)
    for p, what in (("pkg00", "content differs"), ("pkg01", "LICENSE"), ("pkg02", "share/new-file")):
        expect(p in err and what in err, f"{p} not reported ({what}): {err}")
    for p, snap in edited.items():
        expect(snapshot(os.path.join(s, p)) == snap, f"{p} was touched")
    for p in ("pkg03", "pkg04"):
        expect(not os.path.exists(os.path.join(s, p)), f"{p} not cleaned")
    # Why each tree was kept outlives the run: the journal says it (status --journal).
    rows = t.json(s, "status", "--journal", "50")["journal"]
    kept = {r["package"]: r["detail"] for r in rows if r["command"] == "cleanup" and r["detail"].startswith("kept: ")}
    expect(set(kept) == {"pkg00", "pkg01", "pkg02"} and "LICENSE" in kept["pkg00"] and "share" in kept["pkg02"],
           f"journaled kept trees: {kept}")
    # verify names the drift too, and a rerun of cleanup still keeps them
    t.run(s, "verify", "pkg00", code=1)
    t.run(s, "cleanup", code=1)
    for p, snap in edited.items():
        expect(snapshot(os.path.join(s, p)) == snap, f"{p} was touched by the second cleanup")
    # ... and says so once: the same reason again adds no row (a nightly cleanup would fill the journal).
    rows = t.json(s, "status", "--journal", "100")["journal"]
    again = [r["package"] for r in rows if r["command"] == "cleanup" and r["detail"].startswith("kept: ")]
    expect(sorted(again) == ["pkg00", "pkg01", "pkg02"], f"kept rows after two cleanups: {again}")


@test
def cleanup_repairs_a_corrupt_object_from_the_proven_legacy_file(t):
    """An object corrupted in place at the same size: cleanup re-hashes, rewrites it from the legacy file
    (which still matches the manifest), keeps the bad copy in migration/corrupt/, then deletes the tree."""
    s = t.store("repair", 2)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    flip_a_byte(object_of(s, "pkg00", "LICENSE"))
    code, out, err = t.run(s, "cleanup", code=0)
    expect("repaired" in err, f"repair not reported: {err}")
    expect(len(os.listdir(os.path.join(s, "migration", "corrupt"))) == 1, "bad copy not quarantined")
    all_exact(t, s, before, "cas")


@test
def cutover_rehashes_every_object(t):
    """Found case 4: cutover checked only object sizes. A same-size corrupt object refuses the cutover."""
    s = t.store("cutover-hash", 2)
    t.run(s, "migrate", code=0)
    flip_a_byte(object_of(s, "pkg01", "bin/tool1"))
    code, out, err = t.run(s, "cutover", code=3)
    expect("do not hash" in err or "does not match" in err, f"reason: {err}")
    expect(t.json(s, "status")["mode"] == "dual", "mode changed")


@test
def packages_migrated_after_cutover_end_verified_and_get_cleaned(t):
    """Found case 8: a package migrated after cutover stays `migrated` for ever."""
    s = t.store("late", 2)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    put(os.path.join(s, "late-pkg"), "bin/x", b"late package", 0o755)
    before = snapshot(os.path.join(s, "late-pkg"), owners=True)
    t.run(s, "migrate", code=0)
    st = t.json(s, "status")
    expect(st["packages"]["verified"] == 3 and st["packages"]["migrated"] == 0, f"states: {st['packages']}")
    t.run(s, "cleanup", code=0)
    expect(not os.path.exists(os.path.join(s, "late-pkg")), "late package not cleaned")
    dest = os.path.join(t.work, "late-out")
    t.run(s, "materialize", "late-pkg", dest, code=0)
    expect(snapshot(dest, owners=True) == before, "late package not exact")


@test
def named_migrate_rechecks_a_verified_package(t):
    """Found case 8: `migrate PKG` on a verified package whose legacy tree changed did nothing (exit 0),
    so readers kept the stale manifest. Before cutover it is migrated again; after cutover it is reported
    and kept."""
    s = t.store("recheck", 2)
    t.run(s, "migrate", code=0)
    put(os.path.join(s, "pkg00"), "bin/tool0", b"upgraded tool", 0o755)
    t.run(s, "migrate", "pkg00", code=0)
    dest = os.path.join(t.work, "recheck-out")
    t.run(s, "materialize", "pkg00", dest, code=0)
    expect(open(os.path.join(dest, "bin/tool0"), "rb").read() == b"upgraded tool", "stale manifest kept")
    # unchanged: nothing to do, exit 0
    t.run(s, "migrate", "pkg01", code=0)
    t.run(s, "cutover", code=0)
    put(os.path.join(s, "pkg01"), "bin/tool1", b"edited after cutover", 0o755)
    code, out, err = t.run(s, "migrate", "pkg01", code=1)
    expect("pkg01" in err and "after cutover" in err, f"not reported: {err}")
    t.run(s, "cleanup", code=1)
    expect(open(os.path.join(s, "pkg01", "bin/tool1"), "rb").read() == b"edited after cutover", "tree not kept")


@test
def rollback_goes_on_package_by_package(t):
    """Found case 8: one missing object stopped every package, and the error named an object path.
    Now the package is named, the others come back, the mode stays until it can be restored."""
    s = t.store("pbp", 4)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    # the object only pkg02 has: its tool
    obj = object_of(s, "pkg02", "bin/tool2")
    saved = open(obj, "rb").read()
    os.chmod(obj, 0o644)
    os.unlink(obj)
    code, out, err = t.run(s, "rollback", code=1)
    expect("pkg02" in err, f"pkg02 not named: {err}")
    for p in ("pkg00", "pkg01", "pkg03"):
        expect(snapshot(os.path.join(s, p), owners=True) == before[p], f"{p} not restored")
    st = t.json(s, "status")
    expect(st["mode"] == "file-level", f"mode changed with a package missing: {st['mode']}")
    # put the object back (from a backup): a second rollback finishes
    with open(obj, "wb") as f:
        f.write(saved)
    os.chmod(obj, 0o444)
    t.run(s, "rollback", code=0)
    all_exact(t, s, before)
    expect(t.json(s, "status")["mode"] == "legacy", "not legacy after the second rollback")


@test
def rollback_never_rebuilds_from_a_corrupt_object(t):
    """An object corrupted in place at the same size after cleanup: rollback names the package and does
    not rebuild it with wrong bytes; the other packages come back."""
    s = t.store("rb-corrupt", 3)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    flip_a_byte(object_of(s, "pkg01", "bin/tool1"))
    code, out, err = t.run(s, "rollback", code=1)
    expect("pkg01" in err and "does not match" in err, f"not named: {err}")
    expect(not os.path.exists(os.path.join(s, "pkg01")), "pkg01 rebuilt from a corrupt object")
    for p in ("pkg00", "pkg02"):
        expect(snapshot(os.path.join(s, p), owners=True) == before[p], f"{p} not restored")


@test
def verify_compares_mtime_owner_and_hard_links(t):
    """Found case 8: verify ignored mtime, owner and hard-link structure, which rollback restores."""
    def extra(root):
        os.link(os.path.join(root, "pkg00", "LICENSE"), os.path.join(root, "pkg00", "LICENSE.hard"))
    s = t.store("meta", 3, extra=extra)
    t.run(s, "migrate", code=0)
    os.utime(os.path.join(s, "pkg00", "bin", "tool0"), ns=(0, 1_000_000_123))
    code, out, err = t.run(s, "verify", "pkg00", code=1)
    expect("mtime differs" in err, f"mtime: {err}")
    os.chown(os.path.join(s, "pkg01", "bin", "tool1"), 1234, 1234)
    code, out, err = t.run(s, "verify", "pkg01", code=1)
    expect("owner differs" in err, f"owner: {err}")
    lic = os.path.join(s, "pkg00", "LICENSE.hard")
    st = os.stat(lic)
    data = open(lic, "rb").read()
    os.unlink(lic)
    with open(lic, "wb") as f:
        f.write(data)
    os.utime(lic, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out, err = t.run(s, "verify", "pkg00", code=1)
    expect("hard links differ" in err, f"hard links: {err}")


@test
def a_vanished_tree_with_a_manifest_is_never_dropped(t):
    """Found cases 1 and 8: discovery dropped packages whose directory vanished, with their manifest;
    gc then deleted their objects. A package with a manifest is kept (tree recorded removed) and rollback
    rebuilds it."""
    s = t.store("vanish", 3)
    before = pristine(t, s)
    t.run(s, "migrate", code=0)
    shutil.rmtree(os.path.join(s, "pkg01"))
    t.run(s, "migrate", code=0)
    t.run(s, "gc", code=0)
    st = t.json(s, "status")
    expect(st["packages"]["total"] == 3 and st["legacy_trees"]["removed"] == 1, f"status: {st}")
    t.run(s, "rollback", code=0)
    all_exact(t, s, before)


@test
def cleanup_as_non_root_refuses_what_it_could_not_undo(t):
    """Found case 8: run as non-root, cleanup + rollback silently dropped foreign owners. Now cleanup
    refuses (exit 3) and deletes nothing."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        print("  skip: needs root (to make a store with two owners) and setpriv")
        return
    os.chmod(t.work, 0o755)  # mkdtemp made it 0700
    s = t.store("nonroot", 2)
    for dp, dns, fns in os.walk(s):
        for n in dns + fns:
            os.lchown(os.path.join(dp, n), 65534, 65534)
    os.chown(s, 65534, 65534)
    os.chown(os.path.join(s, "pkg00", "LICENSE"), 0, 0)  # a file owned by root, readable by all

    def as_nobody(*args, code):
        p = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                            t.casmig, "--store", s] + list(args), capture_output=True, text=True)
        expect(p.returncode == code, f"{args} exited {p.returncode}, expected {code}: {p.stderr}")
        return p
    as_nobody("migrate", code=0)
    as_nobody("cutover", code=0)
    p = as_nobody("cleanup", code=3)
    expect("pkg00" in p.stderr and "root" in p.stderr, f"reason: {p.stderr}")
    expect(os.path.isdir(os.path.join(s, "pkg00")) and os.path.isdir(os.path.join(s, "pkg01")), "a tree was deleted")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-lifecycle"))
