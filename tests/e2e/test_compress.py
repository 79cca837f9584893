#!/usr/bin/env python3
"""The zstd store mode (migrate --compress): the whole lifecycle on compressed objects is exact, damaged
.zst objects are found and quarantined, materialize in every link mode, gc, the mode is chosen once, and
crashes at every durable step of a compressed migrate (the dictionary's included) lose nothing."""
import json
import os
import shutil
import subprocess
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, snapshot, expect  # noqa: E402
from zstd_stores import compressible_store, objects_by_form, setting, package_of, damage  # noqa: E402

@test
def lifecycle_in_zstd_mode_is_exact(t):
    s = compressible_store(t, "life", big=True)
    pristine = {p: snapshot(os.path.join(s, p), owners=True) for p in os.listdir(s)}
    _, out, err = t.run(s, "migrate", "--compress", code=0)
    value = setting(s)
    expect(value and value.startswith("zstd:6:dict="), f"the catalog records the mode with its dictionary: {value!r}")
    dict_name = value.split("dict=")[1]
    expect(os.listdir(os.path.join(s, "packages", "dict")) == [dict_name],
           f"packages/dict/ holds the dictionary the setting names: {os.listdir(os.path.join(s, 'packages', 'dict'))}")
    raw, zst, other = objects_by_form(s)
    expect(len(zst) > 100 and not other, f"small text objects are stored .zst: {len(zst)} zst, {len(raw)} raw, {other}")
    expect(not set(r for r in raw) & set(z[:65] for z in zst), "each digest has one form only")
    # Objects that do not compress (random bytes, the 3-byte file, the empty file) stay raw. The small
    # random blobs were all sampled (in a store this small every small file is), so the dictionary may
    # hold some of them, which then compress with it: later_migrate_… checks one it never saw.
    expect(len(raw) >= 3, f"incompressible and tiny objects stay raw: {len(raw)} raw")
    sizes = {os.lstat(os.path.join(s, "objects", r)).st_size for r in raw}
    expect({0, 3, 9 << 20} <= sizes, f"the empty, the 3-byte and the 9 MiB random objects are raw: {sorted(sizes)[:5]}")
    # The 9 MiB text file went through the streaming compressor (the only object above 8 MiB that compresses).
    big = [z for z in zst if os.lstat(os.path.join(s, "objects", z)).st_size > (256 << 10)]
    expect(len(big) == 1 and os.lstat(os.path.join(s, "objects", big[0])).st_size < (9 << 20) // 2,
           f"the large text file is one .zst object: {big}")
    st = t.json(s, "status")
    expect(st["compression"] == value, f"status names the mode: {st['compression']}")
    expect(st["stored_bytes"] < st["object_bytes"] * 0.7,
           f"stored bytes well under the contents' bytes: {st['stored_bytes']} vs {st['object_bytes']}")
    expect(st["compressed_saved_bytes"] == st["object_bytes"] - st["stored_bytes"] and st["compression_ratio"] > 1.5,
           f"saved bytes and ratio: {st}")
    on_disk = sum(os.lstat(os.path.join(s, "objects", r)).st_size for r in raw + zst)
    expect(st["stored_bytes"] == on_disk, f"stored_bytes is what objects/ holds: {st['stored_bytes']} vs {on_disk}")
    t.run(s, "verify", "--objects", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    expect(not [p for p in os.listdir(s) if p.startswith("pkg")], "cleanup removed every legacy tree")
    t.run(s, "verify", "--objects", code=0)
    t.run(s, "rollback", code=0)
    for p, snap in pristine.items():
        got = snapshot(os.path.join(s, p), owners=True)
        expect(got == snap, f"rollback of {p} is exact: {sorted(set(got.items()) ^ set(snap.items()))[:3]}")
    # Hard links inside a package come back as hard links.
    a, b = os.lstat(os.path.join(s, "pkg03", "LICENSE")), os.lstat(os.path.join(s, "pkg03", "LICENSE.copy"))
    expect(a.st_ino == b.st_ino, "the hard link came back")


@test
def later_migrate_keeps_the_mode_and_the_dictionary(t):
    s = compressible_store(t, "keep", packages=20)
    shutil.move(os.path.join(s, "pkg19"), os.path.join(t.work, "pkg19"))
    t.run(s, "migrate", "--compress", code=0)
    value = setting(s)
    shutil.move(os.path.join(t.work, "pkg19"), os.path.join(s, "pkg19"))
    _, before, _ = objects_by_form(s)[1], None, None
    t.run(s, "migrate", code=0)  # no option: the store's mode holds
    expect(setting(s) == value, f"the setting is unchanged: {setting(s)} vs {value}")
    expect(len(os.listdir(os.path.join(s, "packages", "dict"))) == 1, "no second dictionary is trained")
    raw, zst, _ = objects_by_form(s)
    mine = [z for z in zst if package_of(s, z) == ["pkg19"]]
    expect(mine, "the later package's own objects are compressed too")
    blob = [r for r in raw if package_of(s, r) == ["pkg19"] and os.lstat(os.path.join(s, "objects", r)).st_size > 2000]
    expect(len(blob) == 1, f"its random blob, which no dictionary sample held, stays raw: {blob}")
    t.run(s, "verify", "--objects", code=0)


@test
def compress_refused_on_a_store_with_raw_objects(t):
    s = compressible_store(t, "refuse", packages=3)
    shutil.move(os.path.join(s, "pkg02"), os.path.join(t.work, "refuse-pkg02"))
    t.run(s, "migrate", code=0)
    shutil.move(os.path.join(t.work, "refuse-pkg02"), os.path.join(s, "pkg02"))
    db_before = open(os.path.join(s, "store.db"), "rb").read()
    code, out, err = t.run(s, "migrate", "--compress")
    expect(code == 3, f"refused with exit 3, got {code}: {err}")
    lines = [x for x in err.strip().splitlines() if x]
    expect(len(lines) == 1 and "--compress" in lines[0] and "without --compress" in lines[0],
           f"one line saying what to do: {err!r}")
    expect(setting(s) is None, "no setting was written")
    expect(not objects_by_form(s)[1], "no .zst object was written")
    expect(not os.path.exists(os.path.join(s, "packages", "dict")), "no dictionary was trained")
    st = t.json(s, "status")
    expect(st["packages"]["pending"] == 1 and st["compression"] == "none", f"store unchanged: {st['packages']}")
    t.run(s, "migrate", code=0)
    expect(db_before != open(os.path.join(s, "store.db"), "rb").read(), "sanity: the plain migrate wrote")


@test
def corrupt_zst_objects_are_found_and_quarantined(t):
    s = compressible_store(t, "corrupt", packages=8)
    t.run(s, "migrate", "--compress", code=0)
    _, zst, _ = objects_by_form(s)
    zst = sorted(zst, key=lambda r: os.lstat(os.path.join(s, "objects", r)).st_size)
    victims = {"flip": zst[-1], "truncate": zst[-2], "trailing": zst[-3]}
    for how, rel in victims.items():
        damage(s, rel, how)
    code, out, err = t.run(s, "verify", "--objects")
    expect(code == 1, f"verify --objects exits 1, got {code}")
    for how, rel in victims.items():
        line = [x for x in err.splitlines() if f"objects/{rel}" in x]
        expect(line, f"the {how} object is named: {err[-800:]}")
        expect(not os.path.exists(os.path.join(s, "objects", rel)), f"the {how} object left objects/")
    quarantined = os.listdir(os.path.join(s, "migration", "corrupt"))
    expect(len(quarantined) == 3, f"moved to migration/corrupt/, never deleted: {quarantined}")
    # The packages that need them failed; migrate --retry-failed rewrites them from the legacy trees.
    st = t.json(s, "status")
    expect(st["packages"]["failed"] >= 1, f"the packages needing them failed: {st['packages']}")
    t.run(s, "migrate", "--retry-failed", code=0)
    t.run(s, "verify", "--objects", code=0)
    for rel in victims.values():
        expect(os.path.exists(os.path.join(s, "objects", rel)) or os.path.exists(os.path.join(s, "objects", rel[:65])),
               f"{rel} was rewritten")


@test
def corrupt_zst_found_by_verify_after_cleanup(t):
    s = compressible_store(t, "corrupt-clean", packages=4)
    t.run(s, "migrate", "--compress", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    _, zst, _ = objects_by_form(s)
    rel = max(zst, key=lambda r: os.lstat(os.path.join(s, "objects", r)).st_size)
    owner = package_of(s, rel)[0]
    damage(s, rel, "flip")
    code, _, err = t.run(s, "verify", "--objects")
    expect(code == 1 and f"objects/{rel}" in err and "restore it from a backup" in err,
           f"verify --objects names it and the way back: {code} {err[-600:]}")
    dest = os.path.join(t.work, "corrupt-dest")
    code, _, err = t.run(s, "materialize", owner, dest)
    expect(code != 0, "materialize never exits 0 without the object")


@test
def materialize_all_link_modes(t):
    s = compressible_store(t, "mat", packages=4)
    snap = snapshot(os.path.join(s, "pkg02"))
    t.run(s, "migrate", "--compress", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    for mode in ("copy", "reflink", "hardlink"):
        dest = os.path.join(t.work, f"mat-{mode}")
        r = t.json(s, "materialize", "pkg02", dest, "--link", mode)
        got = snapshot(dest)
        if mode == "hardlink":
            # Write bits may differ for linked files (the contract); content, type and targets may not.
            strip = lambda sn: {k: (v[0], v[2], v[3]) for k, v in sn.items()}  # noqa: E731
            expect(strip(got) == strip(snap), f"hardlink tree has the right content: {mode}")
        else:
            expect(got == snap, f"{mode} tree is exact")
        expect(r["decompressed"] > 0, f"{mode}: files came from .zst objects: {r}")
        if mode == "hardlink":
            expect(r["linked"] >= 1, f"raw objects are still hard-linked: {r}")
            _, out, err = t.run(s, "materialize", "pkg02", dest + "-h", "--link", "hardlink", code=0)
            expect("copied (decompressed) instead of hard-linked" in out + err, f"says which files were copied: {out!r}")
            # A copied file is its own inode; a linked one is the object.
            lic = os.lstat(os.path.join(dest, "lib", "m0.js"))
            expect(lic.st_nlink == 1, "a file of a .zst object is a copy, not a link")
            tiny = os.lstat(os.path.join(dest, "tiny.txt"))  # 3 bytes: always a raw object
            expect(tiny.st_nlink >= 2, "a raw object is hard-linked")


@test
def gc_removes_every_variant_and_keeps_the_dictionary(t):
    s = compressible_store(t, "gc", packages=6)
    t.run(s, "migrate", "--compress", code=0)
    # pkg05's own objects (not shared): its lib files are random text, its README unique.
    _, zst, _ = objects_by_form(s)
    only5 = [z for z in zst if package_of(s, z) == ["pkg05"]]
    expect(only5, "pkg05 has objects of its own")
    t.run(s, "remove", "pkg05", code=0)
    r = t.json(s, "gc")
    expect(r["removed_objects"] >= len(only5), f"gc removed them: {r}")
    for z in only5:
        expect(not os.path.exists(os.path.join(s, "objects", z)), f"{z} is gone")
    expect(os.listdir(os.path.join(s, "packages", "dict")), "the dictionary stays")
    expect(r["freed_bytes"] > 0, f"freed bytes counted: {r}")
    t.run(s, "verify", "--objects", code=0)
    dest = os.path.join(t.work, "gc-dest")
    t.run(s, "materialize", "pkg01", dest, code=0)


@test
def no_dictionary_option_and_levels(t):
    s = compressible_store(t, "nodict", packages=6)
    t.run(s, "migrate", "--compress=9", "--no-dictionary", code=0)
    expect(setting(s) == "zstd:9", f"level 9, no dictionary: {setting(s)}")
    expect(not os.path.exists(os.path.join(s, "packages", "dict")), "no dictionary trained")
    expect(objects_by_form(s)[1], "objects are compressed without a dictionary")
    t.run(s, "verify", "--objects", code=0)
    code, _, err = t.run(s, "migrate", "--compress=99")
    expect(code == 2 and "--compress" in err, f"a level out of range is a usage error: {code} {err}")


@test
def a_damaged_dictionary_is_reported(t):
    s = compressible_store(t, "dict-damage", packages=6)
    t.run(s, "migrate", "--compress", code=0)
    name = os.listdir(os.path.join(s, "packages", "dict"))[0]
    path = os.path.join(s, "packages", "dict", name)
    good = open(path, "rb").read()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(bytes([good[100] ^ 1]))
    code, _, err = t.run(s, "verify", "--objects")
    expect(code == 1 and f"packages/dict/{name}" in err and "restore it from a backup" in err,
           f"verify --objects names the dictionary and the way back: {code} {err[-500:]}")
    expect("needs zstd dictionary" in err, f"the objects that need it are named: {err[-500:]}")
    expect(os.path.exists(path), "the dictionary is never moved or deleted")
    expect(not os.path.exists(os.path.join(s, "migration", "corrupt")),
           "objects that only lack their dictionary are not quarantined")
    with open(path, "wb") as f:  # restored from a backup
        f.write(good)
    t.run(s, "verify", "--objects", code=0)


@test
def stray_files_beside_zst_objects(t):
    """verify --objects meets files that are no object (short names, a .zst suffix on a short name)."""
    s = compressible_store(t, "stray", packages=4)
    t.run(s, "migrate", "--compress", code=0)
    for name in ("junk", "junk.zst", "0" * 62 + ".zs"):
        with open(os.path.join(s, "objects", "ab", name), "wb") as f:
            f.write(b"not an object")
    code, _, err = t.run(s, "verify", "--objects")
    expect(code == 1, f"exit 1, got {code}: {err[-400:]}")
    for name in ("junk", "junk.zst"):
        expect(f"objects/ab/{name}" in err and "not named by a BLAKE3 digest" in err, f"{name} is named: {err[-600:]}")
    expect("casmig: error" not in err, f"no internal error: {err[-400:]}")
    t.run(s, "verify", "--objects", code=0)  # they were moved to migration/corrupt/


def crash_points(t, store_src):
    d = os.path.join(t.work, "discover")
    shutil.copytree(store_src, d, symlinks=True)
    trace = os.path.join(t.work, "trace")
    t.run(d, "migrate", "--compress", code=0, env={"CASMIG_CRASH_TRACE": trace})
    points = []
    for p in open(trace).read().split():
        if p not in points:
            points.append(p)
    return points


@test
def crash_at_every_durable_step_of_a_compressed_migrate(t):
    s = compressible_store(t, "crash-src", packages=6)
    pristine = {p: snapshot(os.path.join(s, p)) for p in os.listdir(s)}
    points = crash_points(t, s)
    for p in ("migrate.dict-staged", "migrate.dict-renamed", "migrate.dict-written", "migrate.compression-recorded"):
        expect(p in points, f"crash point {p} is reached: {points}")
    failures = []
    for point in points:
        # Every mode at the steps this mode adds; the object and catalog steps (the crash matrix covers
        # them in every mode for the raw store) are taken with kill here.
        mine = point.startswith("migrate.dict") or point == "migrate.compression-recorded"
        for mode in ("kill", "power-data", "power-names") if mine else ("kill",):
            c = os.path.join(t.work, f"crash-{point}-{mode}")
            shutil.copytree(s, c, symlinks=True)
            env = {"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode, "CASMIG_CRASH_ROOT": c}
            code, _, err = t.run(c, "migrate", "--compress", env=env)
            if code != -9:
                failures.append(f"{point}/{mode}: did not crash ({code}: {err.strip()[-200:]})")
                continue
            code, _, err = t.run(c, "migrate", "--compress")
            if code != 0:
                failures.append(f"{point}/{mode}: migrate after the crash exited {code}: {err.strip()[-300:]}")
                continue
            code, _, err = t.run(c, "verify", "--objects")
            if code != 0:
                failures.append(f"{point}/{mode}: verify --objects exited {code}: {err.strip()[-300:]}")
            value = setting(c)
            if not value or "dict=" not in value or \
                    not os.path.exists(os.path.join(c, "packages", "dict", value.split("dict=")[1])):
                failures.append(f"{point}/{mode}: setting {value!r} does not name a dictionary on disk")
            st = t.json(c, "status")
            if st["packages"]["verified"] != 6:
                failures.append(f"{point}/{mode}: {st['packages']}")
            for pkg in ("pkg00", "pkg05"):
                dest = os.path.join(c + "-dest", pkg)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                code, _, err = t.run(c, "materialize", pkg, dest)
                if code != 0 or snapshot(dest) != pristine[pkg]:
                    failures.append(f"{point}/{mode}: materialize {pkg} is not exact ({code}: {err.strip()[-200:]})")
            subprocess.run(["rm", "-rf", c, c + "-dest"])
    expect(not failures, "\n".join(failures[:10]))


if __name__ == "__main__":
    sys.exit(harness.main("e2e-compress"))
