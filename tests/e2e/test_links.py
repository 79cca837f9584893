#!/usr/bin/env python3
"""Hard links across packages: recorded at migrate (entries.xlink), restored by rollback as hard links
across the rebuilt trees (or to a partner tree still in place), never between files that are not proven
equal; verify does not call such a link a difference."""
import os
import shutil
import sqlite3
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

MTIME = 1_650_000_000_987_654_321


def linked_store(t, name):
    """pkg00/lib/libshared.so, pkg01/lib/libshared.so and pkg01/lib/alias.so: one inode (3 links)."""
    s = t.store(name, 3)
    a = os.path.join(s, "pkg00", "lib", "libshared.so")
    put(os.path.join(s, "pkg00"), "lib/libshared.so", os.urandom(70_000), 0o755)
    os.utime(a, ns=(MTIME, MTIME))
    os.makedirs(os.path.join(s, "pkg01", "lib"))
    os.link(a, os.path.join(s, "pkg01", "lib", "libshared.so"))
    os.link(a, os.path.join(s, "pkg01", "lib", "alias.so"))
    for d in ("pkg00/lib", "pkg01/lib"):
        os.utime(os.path.join(s, d), ns=(MTIME, MTIME))
    return s, a


def inode(path):
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def xlinks(s):
    db = sqlite3.connect(f"file:{os.path.join(s, 'store.db')}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT p.name, e.path, e.xlink FROM entries e JOIN packages p ON p.id = e.package "
                          "WHERE e.type = 1").fetchall()
    finally:
        db.close()
    return {(bytes(n).decode(), bytes(p).decode()): x for n, p, x in rows}


@test
def cross_package_hard_links_come_back_after_cleanup_and_rollback(t):
    s, a = linked_store(t, "xlink")
    before = {p: snapshot(os.path.join(s, p), owners=True) for p in ("pkg00", "pkg01", "pkg02")}
    m = t.json(s, "migrate")
    expect(m["verified"] == 3 and m["failed"] == 0, f"migrate: {m}")
    x = xlinks(s)
    group = x[("pkg00", "lib/libshared.so")]
    expect(group is not None and x[("pkg01", "lib/libshared.so")] == group and x[("pkg01", "lib/alias.so")] == group,
           f"the group across packages is not recorded: {x}")
    expect(x[("pkg00", "LICENSE")] is None and x[("pkg02", "LICENSE")] is None, f"a file with a single link got a group: {x}")
    t.run(s, "verify", code=0)  # the cross-package link is no difference
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    expect(not os.path.exists(a), "cleanup left the tree")
    r = t.json(s, "rollback")
    expect(r["failed"] == 0 and r["rebuilt"] == 3 and r["linked_across_packages"] == 1, f"rollback: {r}")
    one = inode(os.path.join(s, "pkg00", "lib", "libshared.so"))
    expect(inode(os.path.join(s, "pkg01", "lib", "libshared.so")) == one and
           inode(os.path.join(s, "pkg01", "lib", "alias.so")) == one, "the packages' files are not one inode again")
    expect(os.lstat(a).st_nlink == 3, f"st_nlink is {os.lstat(a).st_nlink}, was 3")
    for p, snap in before.items():
        expect(snapshot(os.path.join(s, p), owners=True) == snap, f"rollback: {p} differs from the original")
    t.run(s, "verify", code=0)
    # A second rollback finds every tree exact and changes nothing.
    r = t.json(s, "rollback")
    expect(r["rebuilt"] == 0 and inode(os.path.join(s, "pkg01", "lib", "alias.so")) == one, f"second rollback: {r}")


@test
def rollback_of_one_package_links_to_its_partner_in_place(t):
    s, a = linked_store(t, "partner")
    t.run(s, "migrate", code=0)
    shutil.rmtree(os.path.join(s, "pkg01"))  # its legacy tree vanished; pkg00's is in place
    expect(os.lstat(a).st_nlink == 1, "setup: the partner's links are gone")
    r = t.json(s, "rollback")
    expect(r["failed"] == 0 and r["rebuilt"] == 1 and r["linked_across_packages"] == 1, f"rollback: {r}")
    expect(inode(os.path.join(s, "pkg01", "lib", "libshared.so")) == inode(a) and
           inode(os.path.join(s, "pkg01", "lib", "alias.so")) == inode(a), "pkg01 is not linked to pkg00's file")
    expect(os.lstat(a).st_nlink == 3, f"st_nlink is {os.lstat(a).st_nlink}, was 3")
    expect(os.lstat(a).st_mtime_ns == MTIME, "the file in place changed")
    t.run(s, "verify", code=0)


@test
def partner_in_place_that_changed_is_never_linked(t):
    s, a = linked_store(t, "drifted")
    t.run(s, "migrate", code=0)
    shutil.rmtree(os.path.join(s, "pkg01"))
    with open(a, "r+b") as f:  # pkg00's file in place now differs (same size and mtime)
        f.write(b"X")
    os.utime(a, ns=(MTIME, MTIME))
    rc, out, err = t.run(s, "rollback")
    expect(rc == 0, f"rollback exited {rc}: {err}")
    b = os.path.join(s, "pkg01", "lib", "libshared.so")
    expect(inode(b) != inode(a), "rollback linked pkg01's file to a file whose content differs")
    expect(inode(os.path.join(s, "pkg01", "lib", "alias.so")) == inode(b), "the link inside pkg01 is lost")
    expect("nothing is lost" in err and "content differs" in err, f"no warning about the unlinked file: {err}")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        da, db = fa.read(), fb.read()
    expect(da[:1] == b"X" and db[:1] != b"X" and da[1:] == db[1:], "a file's content changed")


@test
def a_partner_reached_through_a_symlink_is_never_linked_and_fails_nothing(t):
    """pkg00's lib/ replaced by a symlink to a directory holding the same file: never followed; pkg01 is
    restored with its own copy (not failed) and a warning says so."""
    s, a = linked_store(t, "symlinked")
    t.run(s, "migrate", code=0)
    shutil.rmtree(os.path.join(s, "pkg01"))
    os.rename(os.path.join(s, "pkg00", "lib"), os.path.join(s, "pkg00", "lib-real"))
    os.symlink("lib-real", os.path.join(s, "pkg00", "lib"))
    rc, out, err = t.run(s, "rollback")
    expect(rc == 0, f"rollback exited {rc}: {err}")
    b = os.path.join(s, "pkg01", "lib", "libshared.so")
    real = os.path.join(s, "pkg00", "lib-real", "libshared.so")
    expect(os.path.exists(b) and inode(b) != inode(real), "pkg01 was linked through a symlink (or not restored)")
    expect(os.lstat(real).st_nlink == 1 and sorted(os.listdir(os.path.dirname(real))) == ["libshared.so"],
           "pkg00's directory behind the symlink was written to")
    expect("nothing is lost" in err, f"no warning about the unlinked file: {err}")


@test
def a_link_that_fails_fails_the_package_and_the_next_rollback_links_it(t):
    """No silent copy: an I/O error on the cross-package link leaves that package unrestored (exit 1)."""
    s, a = linked_store(t, "linkfault")
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    # link #1 is pkg01's own alias.so (inside the package), #2 the first link across packages.
    rc, out, err = t.run(s, "rollback", env={"CASMIG_FAULT": "link@2=EIO"})
    expect(rc == 1 and "pkg01" in err and "cannot link" in err, f"rollback exited {rc}: {err}")
    expect(not os.path.exists(os.path.join(s, "pkg01")), "pkg01 was put in place without its link")
    expect(os.path.exists(a) and os.listdir(os.path.join(s, "temp")) == [], "pkg00 missing or temp/ not empty")
    r = t.json(s, "rollback")
    expect(r["failed"] == 0 and r["linked_across_packages"] == 1, f"second rollback: {r}")
    expect(inode(os.path.join(s, "pkg01", "lib", "alias.so")) == inode(a) and os.lstat(a).st_nlink == 3,
           "the second rollback did not link pkg01 to pkg00's file")
    t.run(s, "verify", code=0)


@test
def a_false_group_never_links_different_files(t):
    """An inode number reused after both trees were deleted puts unrelated files in one group: simulated by
    giving them one xlink in the catalog. Files that differ in content or in mtime stay separate."""
    s = t.store("false", 3)
    put(os.path.join(s, "pkg00"), "data/a", b"first file\n" * 100)
    put(os.path.join(s, "pkg01"), "data/b", b"other file\n" * 100)
    put(os.path.join(s, "pkg02"), "data/c", b"first file\n" * 100)  # same content as a, another mtime
    os.utime(os.path.join(s, "pkg02", "data", "c"), ns=(MTIME, MTIME))
    before = {p: snapshot(os.path.join(s, p)) for p in ("pkg00", "pkg01", "pkg02")}
    t.run(s, "migrate", code=0)
    db = sqlite3.connect(os.path.join(s, "store.db"))
    db.execute("UPDATE entries SET xlink = 424242 WHERE path IN (CAST('data/a' AS BLOB), CAST('data/b' AS BLOB), "
               "CAST('data/c' AS BLOB))")
    db.commit()
    db.close()
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    rc, out, err = t.run(s, "--json", "rollback")
    expect(rc == 0, f"rollback exited {rc}: {err}")
    inos = {inode(os.path.join(s, p, "data", n)) for p, n in (("pkg00", "a"), ("pkg01", "b"), ("pkg02", "c"))}
    expect(len(inos) == 3, "rollback linked files that are not the same")
    for p, snap in before.items():
        expect(snapshot(os.path.join(s, p)) == snap, f"rollback: {p} differs from the original")
    expect(err.count("nothing is lost") == 2, f"expected a warning for each unlinked file: {err}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-links"))
