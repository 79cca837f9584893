#!/usr/bin/env python3
"""A catalog that belongs to its store: a missing, empty, truncated, mistyped, foreign, stale or damaged
store.db beside a store that holds objects is never taken for a new store (every command refuses, exit 3,
and nothing is touched); the identity marker and the generation survive crashes between their two
writes; package names read from the catalog never lead outside the store."""
import os
import shutil
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

# Every command a user could run, with the arguments it needs (materialize's DEST is filled in per call).
COMMANDS = [["status"], ["plan"], ["migrate"], ["verify"], ["cutover"], ["cleanup"], ["cleanup", "--dry-run"],
            ["rollback"], ["remove", "pkg00"], ["gc"], ["gc", "--dry-run"], ["materialize", "pkg00", None]]


def marker(s):
    """The store's identity marker as (store_id, generation), or None."""
    path = os.path.join(s, "migration", "identity")
    if not os.path.exists(path):
        return None
    lines = open(path).read().splitlines()
    expect(lines[0] == "casmig-store-identity 1", f"marker: {lines}")
    return lines[1].split()[1], int(lines[2].split()[1])


def cat_identity(db):
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = c.execute("SELECT store_id, generation FROM store_identity").fetchone()
    finally:
        c.close()
    return tuple(row) if row else None


def lifecycle_done(t, name, n=3):
    """A store after migrate, cutover and cleanup: the objects are the only copy of every package."""
    s = t.store(name, n)
    pristine = {p: snapshot(os.path.join(s, p)) for p in sorted(os.listdir(s))}
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    expect(not any(os.path.exists(os.path.join(s, p)) for p in pristine), "cleanup left legacy trees")
    return s, pristine


def every_command_refuses(t, s, what, *extra, words=("rebuild-catalog",)):
    """Runs every command; each must exit 3 with one line naming the way back, and change nothing."""
    objects = snapshot(os.path.join(s, "objects"))

    def names():  # a read-only SQLite connection may leave an empty -wal and a -shm beside the catalog
        return sorted(n for n in os.listdir(s) if not n.endswith(("-wal", "-shm")))
    listing = names()
    for i, cmd in enumerate(COMMANDS):
        args = [a if a is not None else os.path.join(t.work, f"{os.path.basename(s)}-mat{i}") for a in cmd]
        code, out, err = t.run(s, *extra, *args)
        cmd = args
        expect(code == 3, f"{what}: {' '.join(cmd)} exited {code}, expected 3: {err.strip()!r}")
        expect(len(err.strip().splitlines()) == 1, f"{what}: {' '.join(cmd)}: not one line: {err!r}")
        for w in words:
            expect(w in err, f"{what}: {' '.join(cmd)}: message lacks {w!r}: {err.strip()!r}")
        if cmd[0] == "materialize":
            expect(not os.path.exists(args[2]), f"{what}: materialize created its destination")
    expect(snapshot(os.path.join(s, "objects")) == objects, f"{what}: objects changed")
    expect(names() == listing, f"{what}: store listing changed: {names()} vs {listing}")


def rollback_restores(t, s, pristine):
    t.run(s, "rollback", code=0)
    for p, snap in pristine.items():
        expect(snapshot(os.path.join(s, p)) == snap, f"rollback did not rebuild {p} exactly")


# ------------------------------------------------------------------ identity and generation

@test
def fresh_store_gets_identity_and_generation(t):
    s = t.store("fresh", 2)
    t.run(s, "status", code=0)
    expect(marker(s) is None and not os.path.exists(os.path.join(s, "store.db")), "status wrote to a new store")
    t.run(s, "migrate", code=0)
    m = marker(s)
    expect(m is not None and len(m[0]) == 32 and m[1] == 0, f"marker after the first migrate: {m}")
    expect(cat_identity(os.path.join(s, "store.db")) == m, "catalog and marker disagree")
    t.run(s, "verify", code=0)
    t.run(s, "cleanup", "--dry-run", code=3)  # refused before cutover
    t.run(s, "gc", "--dry-run", code=0)
    expect(marker(s) == (m[0], 0), f"non-destructive commands advanced the generation: {marker(s)}")
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    t.run(s, "gc", code=0)
    expect(marker(s) == (m[0], 3), f"three destructive commands: {marker(s)}")
    expect(cat_identity(os.path.join(s, "store.db")) == (m[0], 3), "catalog generation")
    other = t.store("fresh2", 1)
    t.run(other, "migrate", code=0)
    expect(marker(other)[0] != m[0], "two stores share an identity")


@test
def deleted_catalog_refuses_everything(t):
    s, pristine = lifecycle_done(t, "deleted")
    db = os.path.join(s, "store.db")
    shutil.move(db, db + ".saved")
    every_command_refuses(t, s, "deleted store.db")
    expect(not os.path.exists(db), "a command created a new store.db")
    shutil.move(db + ".saved", db)
    rollback_restores(t, s, pristine)


@test
def truncated_catalog_refuses_everything(t):
    s, pristine = lifecycle_done(t, "truncated")
    db = os.path.join(s, "store.db")
    good = open(db, "rb").read()
    for size in [0, len(good) // 2, 100]:
        with open(db, "wb") as f:
            f.write(good[:size])
        every_command_refuses(t, s, f"store.db cut to {size} bytes")
        expect(open(db, "rb").read() == good[:size], f"store.db cut to {size} bytes was rewritten")
    with open(db, "wb") as f:
        f.write(good)
    rollback_restores(t, s, pristine)


@test
def mistyped_db_refuses_everything(t):
    s, pristine = lifecycle_done(t, "mistyped")
    wrong = os.path.join(s, "stroe.db")
    every_command_refuses(t, s, "--db mistyped", "--db", wrong, words=("rebuild-catalog", "--db"))
    expect(not os.path.exists(wrong), "a command created the mistyped catalog")
    # Another store's catalog is foreign.
    other = t.store("mistyped-other", 1)
    t.run(other, "migrate", code=0)
    every_command_refuses(t, s, "--db of another store", "--db", os.path.join(other, "store.db"))
    rollback_restores(t, s, pristine)


@test
def stale_backup_after_cleanup_refuses(t):
    s = t.store("stale", 3)
    pristine = {p: snapshot(os.path.join(s, p)) for p in sorted(os.listdir(s))}
    db = os.path.join(s, "store.db")
    t.run(s, "migrate", code=0)
    shutil.copy(db, os.path.join(t.work, "stale-backup.db"))  # a pre-cutover backup
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    shutil.move(db, os.path.join(t.work, "stale-current.db"))
    shutil.copy(os.path.join(t.work, "stale-backup.db"), db)
    every_command_refuses(t, s, "pre-cutover backup restored", words=("rebuild-catalog", "older"))
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    expect(c.execute("SELECT count(*) FROM packages WHERE has_manifest=1").fetchone()[0] == 3,
           "a refused command dropped packages from the restored backup")
    c.close()
    shutil.copy(os.path.join(t.work, "stale-current.db"), db)  # the way back: a current backup
    rollback_restores(t, s, pristine)


@test
def foreign_wal_beside_restored_catalog_refuses(t):
    # Store A, cut over; its catalog copied while no casmig runs (no -wal).
    s = t.store("walA", 3)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    db = os.path.join(s, "store.db")
    shutil.copy(db, os.path.join(t.work, "walA-backup.db"))
    # Another database's -wal: store B's catalog, written by someone while it was open.
    b = t.store("walB", 30)
    t.run(b, "migrate", code=0)
    bdb = os.path.join(b, "store.db")
    c = sqlite3.connect(bdb)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("UPDATE packages SET updated_at = updated_at + 1")
    c.execute("INSERT INTO journal(at_ns, who, command) VALUES (1, 'someone', 'edit')")
    c.commit()
    wal = open(bdb + "-wal", "rb").read()
    c.close()
    expect(len(wal) > 32, "no -wal to plant")
    # A's backup restored, with B's -wal beside it.
    shutil.copy(os.path.join(t.work, "walA-backup.db"), db)
    for suffix in ["-shm"]:
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    with open(db + "-wal", "wb") as f:
        f.write(wal)
    before = snapshot(s)
    for cmd in [["gc"], ["cleanup"], ["rollback"], ["remove", "pkg01"], ["gc", "--dry-run"], ["cleanup", "--dry-run"]]:
        code, _, err = t.run(s, *cmd)
        expect(code == 3, f"foreign -wal: {' '.join(cmd)} exited {code}, expected 3: {err.strip()!r}")
        expect("rebuild-catalog" in err, f"foreign -wal: {err!r}")
    after = snapshot(s)
    for k in [b"store.db-shm", b"migration/lock"]:  # SQLite's index of the -wal; the lock's holder line
        after.pop(k, None)
        before.pop(k, None)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    expect(not changed, f"a refused command changed the store (or merged the -wal into store.db): {changed}")


# ------------------------------------------------------------------ the marker

@test
def lost_or_damaged_marker_refuses(t):
    s, pristine = lifecycle_done(t, "marker")
    path = os.path.join(s, "migration", "identity")
    good = open(path).read()
    os.remove(path)
    every_command_refuses(t, s, "marker deleted", words=("migration/identity",))
    expect(not os.path.exists(path), "a refused command re-created the marker")
    with open(path, "w") as f:
        f.write(good.replace("generation", "genera"))
    every_command_refuses(t, s, "marker damaged", words=("damaged",))
    with open(path, "w") as f:
        f.write(good)
    rollback_restores(t, s, pristine)


@test
def marker_of_another_store_refuses(t):
    s, pristine = lifecycle_done(t, "swap")
    other = t.store("swap-other", 1)
    t.run(other, "migrate", code=0)
    mine = open(os.path.join(s, "migration", "identity")).read()
    shutil.copy(os.path.join(other, "migration", "identity"), os.path.join(s, "migration", "identity"))
    every_command_refuses(t, s, "marker of another store", words=("another store",))
    with open(os.path.join(s, "migration", "identity"), "w") as f:
        f.write(mine)
    rollback_restores(t, s, pristine)


@test
def catalog_from_before_identities_is_adopted(t):
    # A store migrated by a casmig without store identities: schema 1, no marker.
    s = t.store("adopt", 3)
    t.run(s, "migrate", code=0)
    db = os.path.join(s, "store.db")
    c = sqlite3.connect(db)
    c.execute("DROP TABLE store_identity")
    c.execute("ALTER TABLE packages DROP COLUMN verify_error")  # 0006-verify-failures
    c.execute("ALTER TABLE packages DROP COLUMN verify_failed_at")
    c.execute("ALTER TABLE packages DROP COLUMN manifest")  # schema 0003
    c.execute("ALTER TABLE entries DROP COLUMN xlink")  # added by 0004-cross-package-links
    for sql in ("DROP TRIGGER object_totals_insert", "DROP TRIGGER object_totals_delete",  # 0005-object-totals
                "DROP TRIGGER object_totals_update", "DROP TABLE object_totals"):
        c.execute(sql)
    c.execute("DELETE FROM schema_migrations WHERE version > 1")
    c.execute("PRAGMA user_version=1")
    c.commit()
    c.close()
    os.remove(os.path.join(s, "migration", "identity"))
    t.run(s, "migrate", code=0)  # upgrades the schema and claims the store
    m = marker(s)
    expect(m is not None and cat_identity(db) == m, f"adopted: marker {m}, catalog {cat_identity(db)}")
    expect(t.json(s, "status")["packages"]["verified"] == 3, "adopted catalog lost packages")
    # An empty catalog of the old schema beside objects is not adopted.
    shutil.move(db, db + ".saved")
    os.remove(os.path.join(s, "migration", "identity"))
    c = sqlite3.connect(db)
    c.executescript("CREATE TABLE packages(id INTEGER PRIMARY KEY, name BLOB); CREATE TABLE objects(digest BLOB);"
                    "PRAGMA user_version=1;")
    c.close()
    for cmd in [["status"], ["migrate"], ["gc"]]:
        code, _, err = t.run(s, *cmd)
        expect(code == 3 and "empty" in err, f"empty old catalog: {cmd} exited {code}: {err!r}")


# ------------------------------------------------------------------ crashes between catalog and marker

seams = harness.seams


@test
def crash_between_catalog_and_marker(t):
    if not seams(t):
        print("SKIP crash_between_catalog_and_marker: build without test seams")
        return
    n = 0
    for point in ["generation.committed", "identity.staged", "identity.renamed"]:
        for mode in ["kill", "power-names", "power-data"]:
            for cmd in [["gc"] if n % 2 else ["cutover"]]:  # the same code runs first in every destructive command
                n += 1
                s = t.store(f"crash{n}", 2)
                pristine = {p: snapshot(os.path.join(s, p)) for p in sorted(os.listdir(s))}
                t.run(s, "migrate", code=0)
                before = marker(s)
                env = {"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode, "CASMIG_CRASH_ROOT": s}
                code, _, err = t.run(s, *cmd, env=env)
                expect(code == -9, f"{point} {mode} {cmd}: exited {code}, not killed: {err!r}")
                m, c = marker(s), cat_identity(os.path.join(s, "store.db"))
                expect(m is not None and m[0] == before[0] and c[1] in (m[1], m[1] + 1),
                       f"{point} {mode} {cmd}: marker {m}, catalog {c}")
                t.run(s, "status", code=0)
                t.run(s, "verify", code=0)  # a locked command brings the marker up
                expect(marker(s) == cat_identity(os.path.join(s, "store.db")), f"{point} {mode}: marker not brought up")
                t.run(s, "cutover", code=0)
                t.run(s, "cleanup", code=0)
                t.run(s, "gc", code=0)
                rollback_restores(t, s, pristine)


@test
def crash_while_claiming_a_new_store(t):
    if not seams(t):
        print("SKIP crash_while_claiming_a_new_store: build without test seams")
        return
    for point in ["identity.created", "identity.staged", "identity.renamed"]:
        for mode in ["kill", "power-names"]:
            s = t.store(f"claim-{point}-{mode}", 2)
            env = {"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode, "CASMIG_CRASH_ROOT": s}
            code, _, _ = t.run(s, "migrate", env=env)
            expect(code == -9, f"{point} {mode}: not killed ({code})")
            # No object was written before the marker: the store is still new, and the next run claims it.
            t.run(s, "status", code=0)
            t.run(s, "migrate", code=0)
            m = marker(s)
            expect(m is not None and cat_identity(os.path.join(s, "store.db")) == m, f"{point} {mode}: {m}")
            t.run(s, "gc", code=0)


# ------------------------------------------------------------------ package names

@test
def invalid_package_name_never_leaves_the_store(t):
    for bad in [b"../victim", b"objects", b"a/b"]:
        tag = bad.decode().replace("/", "_").replace(".", "d")
        s = t.store(f"names-{tag}", 2)
        t.run(s, "migrate", code=0)
        t.run(s, "cutover", code=0)
        victim = os.path.join(os.path.dirname(s), "victim")
        shutil.rmtree(victim, ignore_errors=True)
        put(victim, "precious", b"not casmig's\n")
        put(victim, "sub/keep", b"keep me\n", 0o600)
        victim_before = snapshot(victim)
        objects_before = snapshot(os.path.join(s, "objects"))
        db = sqlite3.connect(os.path.join(s, "store.db"))
        src = db.execute("SELECT id FROM packages WHERE name=?", (b"pkg00",)).fetchone()[0]
        # marked for cleanup: cleanup would move <store>/<name> into temp/ and delete it
        db.execute("INSERT INTO packages(name, state, tree, has_manifest, files, bytes) "
                   "SELECT ?, state, 'marked', has_manifest, files, bytes FROM packages WHERE id=?", (bad, src))
        new = db.execute("SELECT id FROM packages WHERE name=?", (bad,)).fetchone()[0]
        db.execute("INSERT INTO entries SELECT ?, path, type, mode, size, digest, target, mtime_ns, uid, gid, link_to, "
                   "xattrs, xlink FROM entries WHERE package=?", (new, src))
        # removed: rollback would build <store>/../victim2
        db.execute("INSERT INTO packages(name, state, tree, has_manifest, files, bytes) "
                   "SELECT ?, state, 'removed', has_manifest, files, bytes FROM packages WHERE id=?", (bad + b"2", src))
        new2 = db.execute("SELECT id FROM packages WHERE name=?", (bad + b"2",)).fetchone()[0]
        db.execute("INSERT INTO entries SELECT ?, path, type, mode, size, digest, target, mtime_ns, uid, gid, link_to, "
                   "xattrs, xlink FROM entries WHERE package=?", (new2, src))
        db.commit()
        db.close()
        trees = {p: snapshot(os.path.join(s, p)) for p in ["pkg00", "pkg01"]}
        name = bad.decode()
        for cmd in [["cleanup"], ["rollback"], ["verify"], ["migrate"], ["materialize", name, os.path.join(t.work, f"m-{tag}")],
                    ["remove", name], ["gc"], ["status"], ["cleanup", "--dry-run"]]:
            code, _, err = t.run(s, *cmd)
            expect(code == 3, f"name {bad!r}: {' '.join(cmd)} exited {code}, expected 3: {err.strip()!r}")
            expect("invalid package name" in err, f"name {bad!r}: {' '.join(cmd)}: {err.strip()!r}")
            expect(snapshot(victim) == victim_before, f"name {bad!r}: {' '.join(cmd)} touched the victim")
            expect(not os.path.exists(os.path.join(os.path.dirname(s), "victim2")), f"{cmd} wrote outside the store")
        expect(snapshot(os.path.join(s, "objects")) == objects_before, f"name {bad!r}: objects changed")
        expect({p: snapshot(os.path.join(s, p)) for p in trees} == trees, f"name {bad!r}: legacy trees changed")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-catalog"))
