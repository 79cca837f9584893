#!/usr/bin/env python3
"""packages/ (manifest objects, refs, store settings) and `casmig rebuild-catalog`: a store that lost its
catalog (deleted, truncated, restored from an old backup) is recreated from the store alone, exactly; a
catalog from the previous release (schema 0002) is upgraded and its manifests written into packages/."""
import glob
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "store-0002.tar.gz")


def trees(s):
    return sorted(n for n in os.listdir(s) if n.startswith("pkg"))


def pristine_of(s):
    return {p: snapshot(os.path.join(s, p), owners=True) for p in trees(s)}


def cleaned_store(t, name, n=4):
    """migrate, cutover, cleanup: the CAS and packages/ are the only copy of every package."""
    s = t.store(name, n, extra=lambda root: (
        os.link(os.path.join(root, "pkg00", "LICENSE"), os.path.join(root, "pkg00", "LICENSE.link")),
        put(os.path.join(root, "pkg01"), "a-c", b"dash"), put(os.path.join(root, "pkg01"), "a/b", b"slash")))
    # A hard-link group whose first path in byte order ("a-c") is not the first one walked ("a/b").
    os.unlink(os.path.join(s, "pkg01", "a-c"))
    os.link(os.path.join(s, "pkg01", "a", "b"), os.path.join(s, "pkg01", "a-c"))
    pristine = pristine_of(s)
    t.run(s, "migrate", code=0)
    return s, pristine


def finish_lifecycle(t, s):
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    expect(trees(s) == [], f"cleanup left trees: {trees(s)}")


def drop_catalog(s):
    for f in glob.glob(os.path.join(s, "store.db*")):
        os.remove(f)


def refused_naming_rebuild(t, s, what):
    code, _, err = t.run(s, "status")
    expect(code == 3 and "rebuild-catalog" in err, f"{what}: status exited {code}: {err!r}")
    code, _, err = t.run(s, "gc")
    expect(code == 3 and "rebuild-catalog" in err, f"{what}: gc exited {code}: {err!r}")


def rollback_is_exact(t, s, pristine, what):
    """rollback exits 0 and every pristine package is back bit for bit (`what` names the failure)."""
    t.run(s, "rollback", code=0)
    for p, snap in pristine.items():
        expect(snapshot(os.path.join(s, p), owners=True) == snap, f"{p}: {what}")


def rebuilt_is_exact(t, s, pristine, what):
    j = t.json(s, "rebuild-catalog")
    expect(j["recovered"] == len(pristine) and j["lost"] == 0 and j["failed"] == 0, f"{what}: rebuild: {j}")
    st = t.json(s, "status")
    expect(st["packages"]["verified"] == len(pristine), f"{what}: status after rebuild: {st}")
    t.run(s, "verify", "--objects", code=0)
    rollback_is_exact(t, s, pristine, f"{what}: rollback after rebuild-catalog did not rebuild a package exactly")
    return j


# ------------------------------------------------------------------ a small codec of docs/format.md v1

def _varint(data, i):
    v = shift = 0
    while True:
        b = data[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def _put_varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def file_sizes(data):
    """[(offset of the size varint, size, path)] of every file entry of a v1 manifest."""
    assert data[:16] == b"casmig manifest\n"
    i = 16
    _, i = _varint(data, i)
    count, i = _varint(data, i)
    prev, out = b"", []
    for _ in range(count):
        common, i = _varint(data, i)
        n, i = _varint(data, i)
        path = prev[:common] + data[i:i + n]
        i += n
        typ, flags = data[i], data[i + 1]
        i += 2
        for _f in range(4):  # mode, uid, gid, mtime
            _, i = _varint(data, i)
        if typ == 1:
            at = i
            size, i = _varint(data, i)
            out.append((at, size, path))
            i += 32
            if flags & 1:
                n, i = _varint(data, i)
                i += n
            if flags & 4:
                _, i = _varint(data, i)
        elif typ == 3:
            n, i = _varint(data, i)
            i += n
        if flags & 2:
            n, i = _varint(data, i)
            i += n
        prev = path
    return out


def b3(data):
    return subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True, check=True).stdout.decode().strip()


def put_manifest(s, data):
    h = b3(data)
    d = os.path.join(s, "packages", "manifests", h[:2])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, h[2:]), "wb") as f:
        f.write(data)
    return h


def manifest_of(s, pkg):
    h = open(os.path.join(s, "packages", "refs", pkg)).read().strip()
    return open(os.path.join(s, "packages", "manifests", h[:2], h[2:]), "rb").read()


@test
def migrate_writes_manifests_refs_and_mode_into_packages(t):
    s, _ = cleaned_store(t, "layout", 3)
    refs = sorted(os.listdir(os.path.join(s, "packages", "refs")))
    expect(refs == ["pkg00", "pkg01", "pkg02"], f"refs: {refs}")
    c = sqlite3.connect(os.path.join(s, "store.db"))
    rows = dict(c.execute("SELECT name, hex(manifest) FROM packages").fetchall())
    c.close()
    for p in refs:
        digest = open(os.path.join(s, "packages", "refs", p)).read()
        expect(len(digest) == 65 and digest.endswith("\n"), f"ref {p}: {digest!r}")
        expect(rows[p.encode()].lower() == digest[:64], f"catalog and ref disagree for {p}")
        m = os.path.join(s, "packages", "manifests", digest[:2], digest[2:64])
        expect(os.stat(m).st_mode & 0o777 == 0o444, f"manifest object mode {oct(os.stat(m).st_mode)}")
        data = open(m, "rb").read()
        expect(data.startswith(b"casmig manifest\n"), "manifest header")
        got = subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True).stdout.decode().strip() \
            if shutil.which("b3sum") else digest[:64]
        expect(got == digest[:64], f"manifest object is not named by its BLAKE3: {got}")
    settings = open(os.path.join(s, "packages", "store")).read()
    expect(settings == "casmig-store 1\nmode dual\n", f"packages/store: {settings!r}")
    t.run(s, "cutover", code=0)
    expect("mode file-level" in open(os.path.join(s, "packages", "store")).read(), "cutover did not mirror the mode")
    # materialize rebuilds the cross-order hard-link group (its first path in byte order comes first)
    dest = os.path.join(t.work, "layout-mat")
    t.run(s, "materialize", "pkg01", dest, code=0)
    expect(os.stat(os.path.join(dest, "a-c")).st_ino == os.stat(os.path.join(dest, "a", "b")).st_ino,
           "hard link a-c / a/b not recreated")


@test
def deleted_catalog_after_cleanup_is_rebuilt_exactly(t):
    s, pristine = cleaned_store(t, "deleted")
    finish_lifecycle(t, s)
    drop_catalog(s)
    refused_naming_rebuild(t, s, "deleted catalog")
    j = rebuilt_is_exact(t, s, pristine, "deleted catalog")
    expect(j["mode"] == "file-level" and j["old_catalog"] == "", f"rebuild of a deleted catalog: {j}")


@test
def truncated_catalog_is_rebuilt_exactly_and_kept_aside(t):
    s, pristine = cleaned_store(t, "truncated")
    finish_lifecycle(t, s)
    db = os.path.join(s, "store.db")
    t.run(s, "status", code=0)
    with open(db, "wb"):
        pass
    refused_naming_rebuild(t, s, "truncated catalog")
    j = rebuilt_is_exact(t, s, pristine, "truncated catalog")
    expect(j["old_catalog"].startswith(db + ".replaced-") and os.path.getsize(j["old_catalog"]) == 0,
           f"the 0-byte catalog was not kept aside: {j}")


@test
def catalog_restored_from_a_backup_before_cutover_is_rebuilt_exactly(t):
    s, pristine = cleaned_store(t, "backup")
    db = os.path.join(s, "store.db")
    backup = os.path.join(t.work, "backup-store.db")
    src, dst = sqlite3.connect(db), sqlite3.connect(backup)
    src.backup(dst)
    src.close()
    dst.close()
    finish_lifecycle(t, s)
    drop_catalog(s)
    shutil.copy(backup, db)
    refused_naming_rebuild(t, s, "catalog restored from before cutover")
    rebuilt_is_exact(t, s, pristine, "catalog restored from before cutover")


@test
def rebuild_refuses_a_sound_catalog_unless_forced(t):
    s, pristine = cleaned_store(t, "sound", 2)
    before = open(os.path.join(s, "store.db"), "rb").read()
    code, _, err = t.run(s, "rebuild-catalog")
    expect(code == 3 and "--force" in err, f"rebuild of a sound catalog: {code} {err!r}")
    expect(open(os.path.join(s, "store.db"), "rb").read() == before, "a refused rebuild changed the catalog")
    j = t.json(s, "rebuild-catalog", "--force")
    expect(j["recovered"] == 2 and j["mode"] == "dual" and os.path.exists(j["old_catalog"]), f"forced rebuild: {j}")
    t.run(s, "verify", code=0)
    # the journal says what happened and what could not be recovered
    c = sqlite3.connect(os.path.join(s, "store.db"))
    details = [r[0] for r in c.execute("SELECT detail FROM journal WHERE command='rebuild-catalog'")]
    c.close()
    expect(any("not recoverable" in d and j["old_catalog"] in d for d in details), f"journal after rebuild: {details}")


@test
def rebuild_in_dual_mode_rechecks_present_trees(t):
    s, pristine = cleaned_store(t, "dual", 3)
    with open(os.path.join(s, "pkg02", "bin", "tool2"), "ab") as f:
        f.write(b"edited after migration")
    drop_catalog(s)
    code, out, err = t.run(s, "rebuild-catalog")
    expect(code == 1 and "pkg02" in err and "bin/tool2" in err, f"drifted tree after rebuild: {code} {err!r}")
    st = t.json(s, "status")["packages"]
    expect(st["verified"] == 2 and st["failed"] == 1, f"states after rebuild: {st}")
    t.run(s, "migrate", "--retry-failed", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == 3, "retry after rebuild did not verify the package")


@test
def damaged_manifest_is_named_and_what_is_lost_is_said(t):
    s, pristine = cleaned_store(t, "damaged", 3)
    finish_lifecycle(t, s)
    ref = open(os.path.join(s, "packages", "refs", "pkg01")).read().strip()
    m = os.path.join(s, "packages", "manifests", ref[:2], ref[2:])
    os.chmod(m, 0o644)
    with open(m, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    # verify --objects finds the damaged manifest object and writes it again from the catalog
    code, _, err = t.run(s, "verify", "--objects")
    expect(code == 1 and "packages/manifests/" + ref[:2] in err, f"verify --objects on a damaged manifest: {code} {err!r}")
    t.run(s, "verify", "--objects", code=0)
    # damaged again, and the catalog is lost: the package is named as lost, the others come back
    os.chmod(m, 0o644)
    with open(m, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    drop_catalog(s)
    code, out, err = t.run(s, "rebuild-catalog")
    expect(code == 1 and "pkg01" in err and "damaged" in err, f"rebuild with a damaged manifest: {code} {err!r}")
    st = t.json(s, "status")["packages"]
    expect(st["verified"] == 2 and st["failed"] == 1, f"states: {st}")
    t.run(s, "rollback", code=1)  # pkg01 cannot come back, and the run says so
    for p in ("pkg00", "pkg02"):
        expect(snapshot(os.path.join(s, p), owners=True) == pristine[p], f"{p} not restored exactly")


@test
def rebuild_rehashes_objects_and_names_what_a_corrupt_one_costs(t):
    s, pristine = cleaned_store(t, "corrupt-object", 3)
    finish_lifecycle(t, s)
    # pkg02's own tool is in no other package: corrupt its object at the same size
    c = sqlite3.connect(os.path.join(s, "store.db"))
    digest = c.execute("SELECT hex(e.digest) FROM entries e JOIN packages p ON p.id = e.package "
                       "WHERE p.name = CAST('pkg02' AS BLOB) AND e.path = CAST('bin/tool2' AS BLOB)").fetchone()[0].lower()
    c.close()
    obj = os.path.join(s, "objects", digest[:2], digest[2:])
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"X")
    drop_catalog(s)
    code, out, err = t.run(s, "rebuild-catalog")
    expect(code == 1 and "pkg02" in err and "bin/tool2" in err, f"rebuild over a corrupt object: {code} {err!r}")
    expect(not os.path.exists(obj) and glob.glob(os.path.join(s, "migration", "corrupt", digest + "*")),
           "the corrupt object was not quarantined")
    st = t.json(s, "status")["packages"]
    expect(st["verified"] == 2 and st["failed"] == 1, f"states: {st}")


@test
def migrate_replaces_a_damaged_file_at_a_manifest_name(t):
    s, pristine = cleaned_store(t, "planted-manifest", 2)
    ref = open(os.path.join(s, "packages", "refs", "pkg00")).read().strip()
    m = os.path.join(s, "packages", "manifests", ref[:2], ref[2:])
    good = open(m, "rb").read()
    os.chmod(m, 0o644)
    with open(m, "wb") as f:
        f.write(good[:-1] + bytes([good[-1] ^ 1]))
    t.run(s, "rollback", code=0)   # dual -> legacy: the packages become rolled_back
    code, _, err = t.run(s, "migrate")  # the same trees: the same manifest, whose name is taken by bad bytes
    expect(code == 1 and "was not the manifest its name says" in err, f"migrate over a damaged manifest: {code} {err!r}")
    expect(open(m, "rb").read() == good, "migrate kept a damaged file at the manifest's name")
    expect(glob.glob(os.path.join(s, "migration", "corrupt", "manifest-" + ref + ".*")), "the damaged file was not kept aside")
    t.run(s, "verify", "--objects", code=0)


@test
def interrupted_remove_then_lost_catalog_never_brings_the_package_back(t):
    # remove drops the package's ref before its catalog row: wherever it stops, a catalog lost then
    # and rebuilt from packages/ never lists a package the admin removed with its tree (and the tree a
    # stop left moved aside is kept, never deleted).
    if not harness_seams(t):
        print("SKIP interrupted_remove_then_lost_catalog_never_brings_the_package_back: build without test seams")
        return
    for point in ["packages.ref-dropped", "remove.recorded"]:
        s, pristine = cleaned_store(t, "remove-" + point.replace(".", "-"), 3)
        code, _, _ = t.run(s, "remove", "pkg02", env={"CASMIG_CRASH_AT": point})
        expect(code != 0, f"{point}: not reached")
        drop_catalog(s)
        code, out, err = t.run(s, "rebuild-catalog")
        expect(code in (0, 1), f"{point}: rebuild-catalog exited {code}: {err!r}")
        st = t.json(s, "status")["packages"]
        expect(st["total"] == 2, f"{point}: the removed package came back: {st}")
        expect(not os.path.exists(os.path.join(s, "pkg02")), f"{point}: pkg02 is back under its name")
        for p in ("pkg00", "pkg01"):
            expect(snapshot(os.path.join(s, p), owners=True) == pristine[p], f"{point}: {p} changed")
        t.run(s, "verify", "--objects", code=0)


@test
def interrupted_cleanup_then_lost_catalog_puts_the_tree_back(t):
    if not harness_seams(t):
        print("SKIP interrupted_cleanup_then_lost_catalog_puts_the_tree_back: build without test seams")
        return
    s, pristine = cleaned_store(t, "trash", 2)
    t.run(s, "cutover", code=0)
    code, _, _ = t.run(s, "cleanup", env={"CASMIG_CRASH_AT": "cleanup.moved-aside"})
    expect(code != 0 and any(n.startswith("trash-") for n in os.listdir(os.path.join(s, "temp"))), "no tree in temp/")
    drop_catalog(s)
    code, out, err = t.run(s, "rebuild-catalog")
    expect(code == 0, f"rebuild after an interrupted cleanup: {code} {err!r}")
    expect(not any(n.startswith("trash-") for n in os.listdir(os.path.join(s, "temp"))), "tree left in temp/")
    for p, snap in pristine.items():
        expect(snapshot(os.path.join(s, p), owners=True) == snap, f"{p} not back in place exactly")
    t.run(s, "cleanup", code=0)
    rollback_exact = lambda: [expect(snapshot(os.path.join(s, p), owners=True) == snap, f"{p}") for p, snap in pristine.items()]
    t.run(s, "rollback", code=0)
    rollback_exact()


@test
def a_half_deleted_tree_in_temp_goes_aside_never_back_under_its_name(t):
    if not harness_seams(t):
        print("SKIP a_half_deleted_tree_in_temp_goes_aside_never_back_under_its_name: build without test seams")
        return
    s, pristine = cleaned_store(t, "half", 2)
    t.run(s, "cutover", code=0)
    code, _, err = t.run(s, "cleanup", env={"CASMIG_FAULT": "unlink@4=EIO"})
    trash = [n for n in os.listdir(os.path.join(s, "temp")) if n.startswith("trash-")]
    expect(code != 0 and trash, f"no half-deleted tree in temp/: {code} {err!r}")
    # Which unlink is the 4th depends on the order the threads delete in: the fault may stop the
    # delete before any file of that tree went. Take one more file out, as a delete stopped half-way
    # would have, so that the tree in temp/ is always partial.
    victim = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(s, "temp", trash[0])) for f in sorted(fs))
    os.unlink(victim)
    drop_catalog(s)
    code, out, err = t.run(s, "rebuild-catalog")
    expect(not any(n.startswith("trash-") for n in os.listdir(os.path.join(s, "temp"))), "tree left in temp/")
    expect(glob.glob(os.path.join(s, "migration", "aside", "trash-*")), f"the half-deleted tree was not kept aside: {err!r}")
    for p in trees(s):
        expect(snapshot(os.path.join(s, p), owners=True) == pristine[p], f"{p}: a tree not equal to its manifest came back")
    rollback_is_exact(t, s, pristine, "not rebuilt exactly")


@test
def a_failed_retry_after_cutover_never_drops_the_manifest(t):
    s, pristine = cleaned_store(t, "retry-fl", 2)
    t.run(s, "cutover", code=0)
    c = sqlite3.connect(os.path.join(s, "store.db"))
    c.execute("UPDATE packages SET state='failed', error='test' WHERE name=CAST('pkg01' AS BLOB)")
    c.commit()
    c.close()
    os.mkfifo(os.path.join(s, "pkg01", "a-fifo"))
    code, _, err = t.run(s, "migrate", "--retry-failed")
    expect(code == 1 and "a-fifo" in err, f"retry over a fifo: {code} {err!r}")
    expect(os.path.exists(os.path.join(s, "packages", "refs", "pkg01")), "the failed retry dropped the ref")
    dest = os.path.join(t.work, "retry-fl-mat")
    t.run(s, "materialize", "pkg01", dest, code=0)
    expect(snapshot(dest, owners=True) == pristine["pkg01"], "the manifest kept after the failed retry is not the package")


@test
def a_compressed_store_is_rebuilt_compressed_and_exact(t):
    s = t.store("zstd", 4)
    pristine = pristine_of(s)
    t.run(s, "migrate", "--compress", code=0)
    finish_lifecycle(t, s)
    before = t.json(s, "status")
    expect("compression" in open(os.path.join(s, "packages", "store")).read(), "packages/store lacks the compression mode")
    drop_catalog(s)
    j = t.json(s, "rebuild-catalog")
    expect(j["compression"].startswith("zstd:") and j["recovered"] == 4, f"rebuild of a compressed store: {j}")
    after = t.json(s, "status")
    expect(after["stored_bytes"] == before["stored_bytes"], f"stored bytes {before['stored_bytes']} -> {after['stored_bytes']}")
    t.run(s, "verify", "--objects", code=0)
    rollback_is_exact(t, s, pristine, "not rebuilt exactly")


@test
def power_cut_after_refs_are_placed_leaves_every_ref_naming_a_sound_manifest(t):
    # Data before name: the staged manifests and refs are made durable (syncfs) before any rename, so a
    # power cut that loses unsynced file data never leaves a ref or a manifest name over lost bytes.
    if not harness_seams(t):
        print("SKIP power_cut_after_refs_are_placed_leaves_every_ref_naming_a_sound_manifest: build without test seams")
        return
    import matrix
    for point in ["packages.manifests-placed", "packages.refs-placed"]:
        s = t.store("power-" + point, 3)
        t.run(s, "migrate", code=0)
        # A new package made only of contents the CAS already holds: its batch publishes no object (no
        # syncfs of objects' that would make the staged manifest durable by chance).
        shutil.copytree(os.path.join(s, "pkg00"), os.path.join(s, "pkg-copy"), symlinks=True)
        os.rename(os.path.join(s, "pkg-copy", "bin", "tool0"), os.path.join(s, "pkg-copy", "bin", "renamed-tool"))
        code, _, _ = t.run(s, "migrate", env={"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": "power-data",
                                              "CASMIG_CRASH_ROOT": s})
        expect(code != 0, f"{point}: not reached")
        bad = matrix.bad_manifests(s)
        expect(not bad, f"power cut at {point}: {bad}")
        t.run(s, "migrate", code=0)
        expect(not matrix.bad_manifests(s), f"after the rerun: {matrix.bad_manifests(s)}")


harness_seams = harness.seams


@test
def killed_rebuild_then_rebuild_again(t):
    if not harness_seams(t):
        print("SKIP killed_rebuild_then_rebuild_again: build without test seams")
        return
    for point in ["rebuild.old-moved", "rebuild.committed"]:
        for mode in ["kill", "power-names"]:
            s, pristine = cleaned_store(t, f"kill-{point}-{mode}", 2)
            finish_lifecycle(t, s)
            drop_catalog(s)
            code, _, _ = t.run(s, "rebuild-catalog", env={"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode,
                                                           "CASMIG_CRASH_ROOT": s})
            expect(code != 0, f"{point}/{mode}: the crash point was not reached")
            code, _, err = t.run(s, "status")
            if code != 0:
                expect(code == 3 and "rebuild-catalog" in err, f"{point}/{mode}: status after the crash: {code} {err!r}")
                t.run(s, "rebuild-catalog", code=0)
            t.run(s, "verify", "--objects", code=0)
            t.run(s, "rollback", code=0)
            for p, snap in pristine.items():
                expect(snapshot(os.path.join(s, p), owners=True) == snap, f"{point}/{mode}: {p} not exact")


@test
def gc_keeps_live_manifests_and_drops_removed_ones(t):
    s, pristine = cleaned_store(t, "gc", 3)
    ref = open(os.path.join(s, "packages", "refs", "pkg02")).read().strip()
    t.run(s, "remove", "pkg02", code=0)
    expect(not os.path.exists(os.path.join(s, "packages", "refs", "pkg02")), "remove left the ref")
    j = t.json(s, "gc")
    expect(j["removed_manifests"] == 1, f"gc: {j}")
    expect(not os.path.exists(os.path.join(s, "packages", "manifests", ref[:2], ref[2:])), "gc kept a dead manifest")
    expect(len(os.listdir(os.path.join(s, "packages", "refs"))) == 2, "gc touched live refs")
    t.run(s, "verify", "--objects", code=0)
    # A stale ref (a stop between the catalog commit and the ref's removal) is dropped by the next command.
    shutil.copy(os.path.join(s, "packages", "refs", "pkg00"), os.path.join(s, "packages", "refs", "pkg99"))
    t.run(s, "verify", code=0)
    expect(not os.path.exists(os.path.join(s, "packages", "refs", "pkg99")), "stale ref kept")


@test
def store_from_schema_0002_is_upgraded_then_survives_a_lost_catalog(t):
    work = os.path.join(t.work, "fixture")
    os.makedirs(work)
    with tarfile.open(FIXTURE) as tf:
        tf.extractall(work)
    s = os.path.join(work, "store")
    # tarfile cannot set a symlink's mtime; the fixture's are all 1700000000 (make-store-0002.py)
    for d, dirs, files in os.walk(os.fsencode(s)):
        for n in dirs + files:
            if os.path.islink(os.path.join(d, n)):
                os.utime(os.path.join(d, n), (1700000000, 1700000000), follow_symlinks=False)
    names = sorted(n for n in os.listdir(os.fsencode(s)) if n.startswith(b"pkg"))
    pristine = {n: snapshot(os.path.join(os.fsencode(s), n), owners=True) for n in names}
    c = sqlite3.connect(os.path.join(s, "store.db"))
    st = dict(c.execute("SELECT state, COUNT(*) FROM packages GROUP BY state").fetchall())
    version = c.execute("PRAGMA user_version").fetchone()[0]
    c.close()
    expect(version == 2 and st == {"verified": 2, "pending": 1}, f"fixture: schema {version}, states {st}")
    expect(not os.path.exists(os.path.join(s, "packages", "refs")), "the fixture already has refs")
    t.run(s, "migrate", code=0)  # upgrades the catalog (0003), writes the two old manifests, migrates pkg-c
    refs = sorted(os.listdir(os.path.join(os.fsencode(s), b"packages", b"refs")))
    expect(refs == names, f"refs after the upgrade: {refs}")
    c = sqlite3.connect(os.path.join(s, "store.db"))
    version = c.execute("PRAGMA user_version").fetchone()[0]
    missing = c.execute("SELECT COUNT(*) FROM packages WHERE has_manifest=1 AND manifest IS NULL").fetchone()[0]
    c.close()
    expect(version >= 3 and missing == 0, f"schema {version}, {missing} manifests not in packages/")
    finish_lifecycle_any(t, s)
    drop_catalog(s)
    t.run(s, "rebuild-catalog", code=0)
    t.run(s, "verify", "--objects", code=0)
    t.run(s, "rollback", code=0)
    for n, snap in pristine.items():
        expect(snapshot(os.path.join(os.fsencode(s), n), owners=True) == snap, f"{n!r} not rebuilt exactly")


def finish_lifecycle_any(t, s):
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    expect(not any(n.startswith(b"pkg") for n in os.listdir(os.fsencode(s))), "cleanup left trees")


@test
def rebuild_after_cutover_keeps_the_manifest_of_a_drifted_tree(t):
    # After cutover the manifest is the truth: a tree that changed must not become the package's content
    # through rebuild-catalog and its advice (re-migrating it would let gc drop the proven content).
    s, pristine = cleaned_store(t, "drift-fl", 3)
    t.run(s, "cutover", code=0)
    os.remove(os.path.join(s, "pkg01", "LICENSE"))
    drop_catalog(s)
    code, _, err = t.run(s, "rebuild-catalog")
    expect(code == 1 and "pkg01" in err and "more" in err and "cleanup keeps the tree" in err, f"rebuild: {code} {err!r}")
    st = t.json(s, "status")["packages"]
    expect(st["verified"] == 3 and st["failed"] == 0, f"states after rebuild: {st}")
    t.run(s, "migrate", "--retry-failed")
    t.run(s, "gc", code=0)
    t.run(s, "cleanup", code=1)  # keeps the drifted tree, reports it
    expect(os.path.isdir(os.path.join(s, "pkg01")), "cleanup deleted a tree that differs")
    rollback_is_exact(t, s, pristine, "not rebuilt exactly")


@test
def a_lost_ref_is_written_again_before_the_catalog_can_be_lost(t):
    s, pristine = cleaned_store(t, "lost-ref", 3)
    finish_lifecycle(t, s)
    os.remove(os.path.join(s, "packages", "refs", "pkg00"))
    t.run(s, "verify", code=0)
    expect(os.path.exists(os.path.join(s, "packages", "refs", "pkg00")), "the next command did not restore the ref")
    drop_catalog(s)
    rebuilt_is_exact(t, s, pristine, "after a lost ref")


@test
def a_manifest_of_a_newer_format_stops_the_rebuild_before_anything_is_written(t):
    s, pristine = cleaned_store(t, "newer", 2)
    finish_lifecycle(t, s)
    data = bytearray(manifest_of(s, "pkg00"))
    data[16] = 2  # format version 2
    h = put_manifest(s, bytes(data))
    with open(os.path.join(s, "packages", "refs", "pkg00"), "w") as f:
        f.write(h + "\n")
    drop_catalog(s)
    code, _, err = t.run(s, "rebuild-catalog")
    expect(code == 3 and "version 2" in err and "pkg00" in err, f"rebuild over a newer manifest: {code} {err!r}")
    expect(not os.path.exists(os.path.join(s, "store.db")) and os.path.exists(os.path.join(s, "packages", "refs", "pkg00")),
           "a refused rebuild wrote a catalog or dropped the ref")


@test
def a_manifest_claiming_a_wrong_size_spoils_only_itself(t):
    s, pristine = cleaned_store(t, "wrong-size", 3)
    finish_lifecycle(t, s)
    data = bytearray(manifest_of(s, "pkg00"))
    at, size, path = next(x for x in file_sizes(bytes(data)) if x[2] == b"LICENSE")  # shared by every package
    enc = _put_varint(size + 1)
    expect(len(enc) == len(_put_varint(size)), "test setup: the size varint changes length")
    data[at:at + len(enc)] = enc
    h = put_manifest(s, bytes(data))
    with open(os.path.join(s, "packages", "refs", "aaa"), "w") as f:
        f.write(h + "\n")
    drop_catalog(s)
    code, _, err = t.run(s, "rebuild-catalog")
    expect(code == 1 and "aaa" in err, f"rebuild with a manifest claiming a wrong size: {code} {err!r}")
    expect(not glob.glob(os.path.join(s, "migration", "corrupt", "*")), "a good object was quarantined")
    st = t.json(s, "status")["packages"]
    expect(st["verified"] == 3 and st["failed"] == 1, f"states: {st}")
    t.run(s, "remove", "aaa", code=0)
    rollback_is_exact(t, s, pristine, "not rebuilt exactly")


@test
def a_rolled_back_store_stays_legacy_when_a_package_is_gone(t):
    s, pristine = cleaned_store(t, "rolled", 3)
    finish_lifecycle(t, s)
    t.run(s, "rollback", code=0)
    subprocess.run(["rm", "-rf", os.path.join(s, "pkg02")], check=True)  # the package manager removed it
    drop_catalog(s)
    j = t.json(s, "rebuild-catalog")
    st = t.json(s, "status")
    expect(j["mode"] == "legacy" and st["legacy_trees"]["marked"] == 0, f"rebuild of a rolled-back store: {j} {st}")
    t.run(s, "cleanup", code=3)  # before cutover: refused, nothing deleted
    for p in ("pkg00", "pkg01"):
        expect(snapshot(os.path.join(s, p), owners=True) == pristine[p], f"{p} changed")


@test
def stray_things_in_packages_never_block_a_command(t):
    s, pristine = cleaned_store(t, "stray", 2)
    finish_lifecycle(t, s)
    os.makedirs(os.path.join(s, "packages", "refs", "zzz"))
    with open(os.path.join(s, "packages", "store"), "w") as f:
        f.write("garbage\n")
    code, _, err = t.run(s, "verify")
    expect(code == 0, f"verify with a stray directory in refs/ and a damaged packages/store: {code} {err!r}")
    expect(open(os.path.join(s, "packages", "store")).read() == "casmig-store 1\nmode file-level\n", "packages/store not rewritten")
    expect(not os.path.exists(os.path.join(s, "packages", "refs", "zzz")) and
           glob.glob(os.path.join(s, "migration", "aside", "ref-zzz*")), "the stray directory was not moved aside")
    os.makedirs(os.path.join(s, "packages", "refs", "yyy"))
    drop_catalog(s)
    j = t.json(s, "rebuild-catalog")
    expect(j["packages"] == 2, f"rebuild made a package of a stray directory: {j}")
    j2 = t.json(s, "rebuild-catalog", "--force")
    j3 = t.json(s, "rebuild-catalog", "--force")  # twice in the same second
    expect(j2["old_catalog"] != j3["old_catalog"], "two forced rebuilds share the old catalog's name")
    rollback_is_exact(t, s, pristine, "not rebuilt exactly")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-rebuild"))
