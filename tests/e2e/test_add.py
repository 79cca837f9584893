#!/usr/bin/env python3
"""End-to-end tests of `casmig add PKG DIR`: the package manager's install path straight into file-level
form (issue 9). A package added is verified, has no legacy tree, reads and materializes exactly, survives
rollback (its tree is built from the CAS), gc keeps its objects; a bad staging directory adds nothing."""
import os
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402


def staging(t, name, extra=None):
    """A package manager's staging directory: content shared with the store's packages (LICENSE), its
    own files, an executable, a symlink, an empty file and directory, a hard-link pair."""
    d = os.path.join(t.work, "staging-" + name)
    put(d, "LICENSE", b"shared license\n" * 20)
    put(d, "bin/" + name, os.urandom(4000), 0o755)
    put(d, "lib/lib" + name + ".so", os.urandom(70 * 1024 + 3), 0o755)
    put(d, "etc/" + name + ".conf", b"key = value\n", 0o600)
    put(d, "share/empty", b"")
    os.makedirs(os.path.join(d, "share/empty-dir"))
    os.symlink(name, os.path.join(d, "bin/alias"))
    os.link(os.path.join(d, "etc", name + ".conf"), os.path.join(d, "etc", "linked.conf"))
    if extra:
        extra(d)
    return d


def states(s):
    db = sqlite3.connect(os.path.join(s, "store.db"))
    rows = {bytes(n).decode() if isinstance(n, bytes) else n: (st, tr)
            for n, st, tr in db.execute("SELECT name, state, tree FROM packages")}
    db.close()
    return rows


@test
def add_puts_a_package_straight_into_file_level_form(t):
    s = t.store("add", 2)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    src = staging(t, "app")
    want = snapshot(src, owners=True)
    before = t.json(s, "status")
    r = t.json(s, "add", "app-1.0", src)
    expect(r["added"] is True and r["files"] == 6 and r["new_objects"] == 3,
           f"add's report: {r} (LICENSE is in the store already; the hard link is one content)")
    expect(not os.path.lexists(os.path.join(s, "app-1.0")), "add made a legacy tree")
    expect(snapshot(src, owners=True) == want, "add changed the staging directory")
    expect(states(s)["app-1.0"] == ("verified", "removed"), f"catalog: {states(s).get('app-1.0')}")
    after = t.json(s, "status")
    expect(after["packages"]["verified"] == before["packages"]["verified"] + 1 and after["mode"] == "file-level",
           f"status: {after}")
    expect(os.path.isfile(os.path.join(s, "packages", "refs", "app-1.0")), "no ref in packages/ for the package")
    dest = os.path.join(t.work, "mat-app")
    t.run(s, "materialize", "app-1.0", dest, code=0)
    expect(snapshot(dest, owners=True) == want, "the package does not materialize as it was staged")
    st = os.lstat(os.path.join(dest, "etc", "app.conf"))
    expect(st.st_nlink == 2, "the hard-link pair did not come back as one inode")
    t.run(s, "verify", "app-1.0", code=0)
    t.run(s, "verify", "--objects", code=0)
    t.run(s, "gc", code=0)
    t.run(s, "verify", "app-1.0", code=0)  # gc kept every object it needs
    # An upgrade: the new version under its own id, then the old one removed; gc frees its own content.
    src2 = staging(t, "app2")
    t.run(s, "add", "app-2.0", src2, code=0)
    t.run(s, "remove", "app-1.0", code=0)
    g = t.json(s, "gc")
    expect(g["removed_objects"] >= 2, f"gc after removing app-1.0: {g}")
    # Rollback builds its tree from the CAS like any cleaned package's.
    t.run(s, "rollback", code=0)
    expect(snapshot(os.path.join(s, "app-2.0"), owners=True) == snapshot(src2, owners=True),
           "rollback did not rebuild the added package exactly")
    expect(states(s)["app-2.0"][0] == "rolled_back", f"after rollback: {states(s)['app-2.0']}")


@test
def add_in_a_legacy_store_makes_it_dual_and_migrate_leaves_the_package_alone(t):
    s = t.store("add-legacy", 2)
    src = staging(t, "tool")
    t.run(s, "add", "tool-1", src, code=0)
    st = t.json(s, "status")
    expect(st["mode"] == "dual" and st["packages"]["verified"] == 1 and st["packages"]["pending"] == 2, f"{st}")
    t.run(s, "migrate", code=0)
    t.run(s, "migrate", "tool-1", code=0)  # named: verified, no tree, nothing to recheck
    expect(states(s)["tool-1"] == ("verified", "removed"), f"{states(s)['tool-1']}")
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    dest = os.path.join(t.work, "mat-tool")
    t.run(s, "materialize", "tool-1", dest, code=0)
    expect(snapshot(dest) == snapshot(src), "tool-1 does not materialize exactly after cutover and cleanup")


@test
def add_refuses_what_it_must_not_overwrite_and_names_bad_input(t):
    s = t.store("add-bad", 2)
    t.run(s, "migrate", code=0)
    src = staging(t, "x")
    for pkg, code, words in [("pkg00", 3, "already in store"), ("../evil", 2, "cannot be a package id"),
                             (".hidden", 2, "cannot be a package id"), ("objects", 2, "cannot be a package id"),
                             ("store.db", 2, "cannot be a package id")]:
        c, out, err = t.run(s, "add", pkg, src)
        expect(c == code and words in err and len(err.strip().splitlines()) == 1, f"add {pkg}: {c} {err!r}")
    c, out, err = t.run(s, "add", "new", os.path.join(t.work, "no-such-dir"))
    expect(c == 2 and "no-such-dir" in err, f"missing staging dir: {c} {err!r}")
    # Something at <store>/<id> that is not in the catalog yet (a tree the next migrate would discover).
    os.makedirs(os.path.join(s, "squatter"))
    put(os.path.join(s, "squatter"), "f", b"x")
    c, out, err = t.run(s, "add", "squatter", src)
    expect(c == 3 and "squatter" in err, f"add over a legacy tree: {c} {err!r}")
    # A special file: the package fails with one line naming the path; nothing is recorded.
    bad = staging(t, "withfifo", extra=lambda d: os.mkfifo(os.path.join(d, "share", "a-fifo")))
    before = states(s)
    c, out, err = t.run(s, "add", "withfifo", bad)
    expect(c == 1 and "share/a-fifo" in err and "withfifo" in err, f"fifo: {c} {err!r}")
    expect(states(s) == before, "a failed add changed the catalog")
    expect(not os.path.exists(os.path.join(s, "packages", "refs", "withfifo")), "a failed add left a ref")
    expect(not os.listdir(os.path.join(s, "temp")), f"temp/ not empty: {os.listdir(os.path.join(s, 'temp'))}")
    # A symlink as the staging root's content is stored as a symlink, never followed out of the directory.
    out_dir = os.path.join(t.work, "outside")
    put(out_dir, "secret", b"not the package's")
    linky = staging(t, "linky", extra=lambda d: os.symlink(out_dir, os.path.join(d, "escape")))
    t.run(s, "add", "linky", linky, code=0)
    dest = os.path.join(t.work, "mat-linky")
    t.run(s, "materialize", "linky", dest, code=0)
    expect(os.path.islink(os.path.join(dest, "escape")) and not os.path.exists(os.path.join(dest, "secret")),
           "the symlink was followed")
    # The store lock: a running command makes add exit 4 at once.
    import fcntl
    with open(os.path.join(s, "migration", "lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        c, out, err = t.run(s, "add", "later", src)
        expect(c == 4, f"add under a held lock: {c} {err!r}")
    t.run(s, "add", "later", src, code=0)


@test
def add_stopped_anywhere_leaves_the_package_added_or_absent(t):
    if not harness.seams(t):
        print("  (no test seams in this build: skipped)")
        return
    for point in ("add.staged", "publish.staged-durable", "publish.durable", "packages.refs-placed", "add.published"):
        for mode in ("kill", "power-names"):
            s = t.store(f"add-crash-{point}-{mode}", 1)
            t.run(s, "migrate", code=0)
            src = staging(t, f"c-{point}-{mode}")
            env = {"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode, "CASMIG_CRASH_ROOT": s}
            code, _, err = t.run(s, "add", "crashy", src, env=env)
            expect(code in (-9, 137), f"add did not stop at {point}: {code} {err}")
            # Not recorded: the next command drops the ref; a new add succeeds; gc collects the rest.
            t.run(s, "status", code=0)
            expect("crashy" not in states(s), f"{point}/{mode}: recorded before the commit")
            t.run(s, "gc", code=0)
            expect(not os.path.exists(os.path.join(s, "packages", "refs", "crashy")), f"{point}: the ref survived gc")
            t.run(s, "add", "crashy", src, code=0)
            dest = os.path.join(t.work, f"mat-{point}-{mode}")
            t.run(s, "materialize", "crashy", dest, code=0)
            expect(snapshot(dest) == snapshot(src), f"{point}/{mode}: the package added after the stop is not exact")


@test
def a_file_changed_after_it_was_read_fails_the_add(t):
    """The staging directory is compared with the manifest before anything is recorded: a file rewritten
    after add read it (same size, so only its content says so) fails the add, naming the path."""
    if not harness.seams(t):
        print("  (no test seams in this build: skipped)")
        return
    s = t.store("add-changed", 1)
    t.run(s, "migrate", code=0)
    src = staging(t, "chg")
    victim = os.path.join(src, "bin", "chg")
    size = os.path.getsize(victim)
    env = {"CASMIG_HOOK_AT": "add.published",
           "CASMIG_HOOK_CMD": f"head -c {size} /dev/zero > '{victim}'"}
    code, out, err = t.run(s, "add", "chg-1", src, env=env)
    expect(code == 1 and "bin/chg" in err and "chg-1" in err, f"a changed file was added: {code} {err!r}")
    expect("chg-1" not in states(s), "recorded although the staging directory changed")
    # packages/ names no package the catalog does not list (rebuild-catalog would bring it back).
    expect(not os.path.exists(os.path.join(s, "packages", "refs", "chg-1")), "the failed add left its ref")
    t.run(s, "gc", code=0)
    t.run(s, "add", "chg-1", src, code=0)  # the directory as it is now
    dest = os.path.join(t.work, "mat-chg")
    t.run(s, "materialize", "chg-1", dest, code=0)
    expect(open(os.path.join(dest, "bin", "chg"), "rb").read() == bytes(size), "the re-added package is not the new content")


if __name__ == "__main__":
    sys.exit(harness.main())
