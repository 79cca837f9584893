#!/usr/bin/env python3
"""casmig convert: a raw store becomes a zstd store and back (--compress / --raw) with every package
exact, status right, objects proven before their old form goes (a corrupt one is reported and kept, a
planted file at the new name is quarantined, never trusted), resumable after a crash at any convert step,
and any command run after a stopped convert loses nothing."""
import os
import shutil
import subprocess
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, snapshot, expect  # noqa: E402
from zstd_stores import compressible_store, objects_by_form, setting, damage  # noqa: E402


def pristine_of(store):
    return {p: snapshot(os.path.join(store, p), owners=True) for p in os.listdir(store) if p.startswith("pkg")}


def on_disk_bytes(store):
    raw, zst, _ = objects_by_form(store)
    return sum(os.lstat(os.path.join(store, "objects", r)).st_size for r in raw + zst)


def mirror(store):
    path = os.path.join(store, "packages", "store")
    if not os.path.exists(path):
        return {}
    lines = open(path).read().splitlines()[1:]
    return dict(x.split(" ", 1) for x in lines)


def rollback_is_exact(t, store, pristine):
    t.run(store, "rollback", code=0)
    for p, snap in pristine.items():
        got = snapshot(os.path.join(store, p), owners=True)
        expect(got == snap, f"rollback of {p} is exact: {sorted(set(got.items()) ^ set(snap.items()))[:3]}")


def materialize_is_exact(t, store, pristine, tag):
    problems = []
    for p, snap in pristine.items():
        dest = os.path.join(t.work, f"{os.path.basename(store)}-{tag}-{p}")
        code, _, err = t.run(store, "materialize", p, dest)
        if code != 0 or snapshot(dest, owners=True) != snap:
            problems.append(f"materialize {p} ({tag}) is not exact: exit {code} {err.strip()[-200:]}")
        shutil.rmtree(dest, ignore_errors=True)
    return problems


def with_seams(fn):
    """A test that drives crash points: skipped, saying so, in a build without the test seams."""
    def run(t):
        if not harness.seams(t):
            print(f"  {fn.__name__}: skipped, casmig built without test seams")
            return
        fn(t)
    run.__name__ = fn.__name__
    return run


def migrated_raw(t, name, packages=8, big=False):
    s = compressible_store(t, name, packages=packages, big=big)
    pristine = pristine_of(s)
    t.run(s, "migrate", code=0)
    expect(setting(s) is None and not objects_by_form(s)[1], "sanity: a raw store")
    return s, pristine


@test
def raw_store_to_zstd_and_back_is_exact(t):
    s, pristine = migrated_raw(t, "life", big=True)
    before = t.json(s, "status")
    r = t.json(s, "convert", "--compress")
    value = setting(s)
    expect(value and value.startswith("zstd:6:dict="), f"the catalog records the mode with a dictionary: {value!r}")
    expect(mirror(s).get("compression") == value, f"packages/store mirrors it: {mirror(s)}")
    expect(os.listdir(os.path.join(s, "packages", "dict")) == [value.split("dict=")[1]], "the dictionary is on disk")
    raw, zst, other = objects_by_form(s)
    expect(not set(raw) & {z[:65] for z in zst}, "each object has one form after the run")
    expect(r["converted"] == len(zst) and r["kept_raw"] == len(raw) and r["failed"] == 0 and
           r["objects"] == len(raw) + len(zst), f"the summary counts the objects: {r}, {len(raw)} raw, {len(zst)} zst")
    expect(len(zst) > 100 and r["bytes_after"] < r["bytes_before"] // 2, f"text compresses: {r}")
    sizes = {os.lstat(os.path.join(s, "objects", x)).st_size for x in raw}
    expect({0, 3, 9 << 20} <= sizes, f"the empty, the 3-byte and the random 9 MiB objects stay raw: {sorted(sizes)[:4]}")
    st = t.json(s, "status")
    expect(st["compression"] == value, f"status names the mode: {st['compression']}")
    expect(st["stored_bytes"] == on_disk_bytes(s), f"stored_bytes is what objects/ holds: {st['stored_bytes']}")
    expect(st["stored_bytes"] < before["stored_bytes"] * 0.7 and st["compression_ratio"] > 1.4 and
           st["saved_bytes"] > before["saved_bytes"], f"status shows the saving: {before} -> {st}")
    _, out, err = t.run(s, "verify", "--objects", code=0)
    # A later migrate writes the new form (the mode is the store's now).
    harness.put(os.path.join(s, "pkgnew"), "index.js", b"module.exports = function () { return 42 }\n" * 50)
    pristine["pkgnew"] = snapshot(os.path.join(s, "pkgnew"), owners=True)
    t.run(s, "migrate", code=0)
    expect(len(objects_by_form(s)[1]) == len(zst) + 1, "the new package's object is written .zst")
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    problems = materialize_is_exact(t, s, pristine, "zstd")
    expect(not problems, "\n".join(problems[:5]))
    # Back to raw, after cleanup (the objects are the only copy).
    n_zst = len(objects_by_form(s)[1])
    r = t.json(s, "convert", "--raw")
    raw, zst, other = objects_by_form(s)
    expect(not zst and r["converted"] == n_zst and r["failed"] == 0, f"no .zst left: {zst[:3]}, {r}")
    expect(setting(s) is None and "compression" not in mirror(s), f"the mode is gone: {setting(s)}, {mirror(s)}")
    st = t.json(s, "status")
    expect(st["compression"] == "none" and st["stored_bytes"] == st["object_bytes"] == on_disk_bytes(s),
           f"status: stored bytes are the contents' bytes again: {st}")
    t.run(s, "verify", "--objects", code=0)
    problems = materialize_is_exact(t, s, pristine, "raw")
    expect(not problems, "\n".join(problems[:5]))
    rollback_is_exact(t, s, pristine)


@test
def usage(t):
    s, _ = migrated_raw(t, "usage", packages=2)
    for args in (["convert"], ["convert", "--compress", "--raw"], ["convert", "--raw", "--no-dictionary"],
                 ["convert", "--compress=23"]):
        code, out, err = t.run(s, *args)
        expect(code == 2 and len(err.strip().splitlines()) == 1, f"{args}: exit 2 with one line, got {code}: {err!r}")
    expect(setting(s) is None and not objects_by_form(s)[1], "nothing was written")


@test
def corrupt_raw_object_is_reported_kept_and_not_converted(t):
    s, pristine = migrated_raw(t, "corrupt")
    raw, _, _ = objects_by_form(s)
    # The largest text object: it would compress (same size, other bytes: only the hash tells).
    victim = max((x for x in raw if os.lstat(os.path.join(s, "objects", x)).st_size < 100000),
                 key=lambda x: os.lstat(os.path.join(s, "objects", x)).st_size)
    damage(s, victim, "flip")
    damaged = open(os.path.join(s, "objects", victim), "rb").read()
    code, out, err = t.run(s, "convert", "--compress")
    expect(code == 1, f"exit 1 when an object could not be converted, got {code}: {err}")
    lines = [x for x in err.splitlines() if victim in x]
    expect(len(lines) == 1 and "verify --objects" in lines[0] and "does not match" in lines[0],
           f"one line names the object and the way out: {err!r}")
    expect(open(os.path.join(s, "objects", victim), "rb").read() == damaged, "the raw file is left as it was")
    expect(not os.path.exists(os.path.join(s, "objects", victim + ".zst")), "no .zst was made from bad bytes")
    expect(len(objects_by_form(s)[1]) > 100, "the other objects were converted")
    # verify --objects quarantines it and names the package; the legacy tree rewrites it.
    t.run(s, "verify", "--objects", code=1)
    t.run(s, "migrate", "--retry-failed", code=0)
    t.run(s, "convert", "--compress", code=0)
    expect(os.path.exists(os.path.join(s, "objects", victim + ".zst")), "rewritten, then converted")
    t.run(s, "verify", "--objects", code=0)
    # The same the other way: a .zst that does not decode to its name stays, and is reported.
    _, zst, _ = objects_by_form(s)
    bad = sorted(zst, key=lambda x: os.lstat(os.path.join(s, "objects", x)).st_size)[-1]
    damage(s, bad, "flip")
    code, out, err = t.run(s, "convert", "--raw")
    expect(code == 1 and len([x for x in err.splitlines() if bad in x]) == 1, f"--raw reports the bad .zst: {code} {err!r}")
    expect(os.path.exists(os.path.join(s, "objects", bad)) and not os.path.exists(os.path.join(s, "objects", bad[:65])),
           "the bad .zst is kept, no raw object made from it")
    expect(objects_by_form(s)[1] == [bad], f"every other object is raw: {objects_by_form(s)[1][:3]}")


@test
def planted_file_at_the_new_name_is_quarantined(t):
    s, pristine = migrated_raw(t, "planted")
    raw, _, _ = objects_by_form(s)
    big = sorted(raw, key=lambda x: os.lstat(os.path.join(s, "objects", x)).st_size)
    victim = [x for x in big if os.lstat(os.path.join(s, "objects", x)).st_size < 100000][-1]
    # A real zstd frame of other bytes, and a file of garbage: neither may take the object's place.
    other = [x for x in big if x != victim][-3]
    subprocess.run(["zstd", "-q", "-f", os.path.join(s, "objects", other), "-o",
                    os.path.join(s, "objects", victim + ".zst")], check=True)
    victim2 = [x for x in big if os.lstat(os.path.join(s, "objects", x)).st_size < 100000][-2]
    with open(os.path.join(s, "objects", victim2 + ".zst"), "wb") as f:
        f.write(b"not a frame at all" * 10)
    code, out, err = t.run(s, "convert", "--compress")
    expect(code == 0, f"convert finishes: {code} {err}")
    corrupt = os.listdir(os.path.join(s, "migration", "corrupt"))
    for v in (victim, victim2):
        name = v[:2] + v[3:] + ".zst"
        expect(any(c.startswith(name) for c in corrupt), f"the planted {name} is in migration/corrupt/: {corrupt}")
        expect(any(v in x and "migration/corrupt" in x for x in err.splitlines()), f"and reported: {err!r}")
        expect(not os.path.exists(os.path.join(s, "objects", v)), "the raw form went once the new one was proven")
    t.run(s, "verify", "--objects", code=0)
    # And back: a file planted at a raw name is not trusted either.
    _, zst, _ = objects_by_form(s)
    target = zst[0][:65]
    with open(os.path.join(s, "objects", target), "wb") as f:
        f.write(b"planted")
    code, out, err = t.run(s, "convert", "--raw")
    expect(code == 0 and any(c.startswith(target[:2] + target[3:] + ".") for c in
                             os.listdir(os.path.join(s, "migration", "corrupt"))),
           f"the planted raw file is moved aside: {code} {err}")
    t.run(s, "verify", "--objects", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    rollback_is_exact(t, s, pristine)


@test
def readers_never_miss_an_object_during_convert(t):
    """materialize (copy and hardlink) runs in a loop while convert works: each run exits 0, exact. Timing
    decides what a run sees; every instant must be fine, so any failure is a real one."""
    s = compressible_store(t, "live", packages=24)
    pristine = pristine_of(s)
    t.run(s, "migrate", code=0)
    problems, runs = [], 0
    for args in (["convert", "--compress"], ["convert", "--raw"]):
        conv = subprocess.Popen([t.casmig, "--store", s, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while conv.poll() is None or runs < 2:
            pkg = f"pkg{runs % 24:02d}"
            link = ("copy", "hardlink")[runs % 2]
            dest = os.path.join(t.work, f"live-{runs}")
            code, _, err = t.run(s, "materialize", pkg, dest, "--link", link)
            got = snapshot(dest, owners=True)
            want = pristine[pkg]
            if link == "hardlink":  # a linked file is the object: content, type and targets must match
                got = {k: (v[0], v[2], v[3]) for k, v in got.items()}
                want = {k: (v[0], v[2], v[3]) for k, v in want.items()}
            if code != 0 or got != want:
                problems.append(f"{' '.join(args)}: materialize {pkg} --link {link}: exit {code} {err.strip()[-200:]}")
            subprocess.run(["rm", "-rf", dest])
            runs += 1
        _, err = conv.communicate()
        expect(conv.returncode == 0, f"{args}: exit {conv.returncode}: {err.decode()[-300:]}")
    expect(not problems, f"{len(problems)} of {runs} materialize runs failed:\n" + "\n".join(problems[:5]))
    t.run(s, "verify", "--objects", code=0)


@test
@with_seams
def materialize_hardlink_copies_when_the_raw_object_went_meanwhile(t):
    """The instant a convert unlinks a raw object (its .zst already placed) while materialize --link
    hardlink, having seen the raw form, links it: the link finds nothing (ENOENT, injected) and the file
    is copied from the .zst form instead of failing the run."""
    s, pristine = migrated_raw(t, "gone", packages=2)
    dest = os.path.join(t.work, "gone-dest")
    code, out, err = t.run(s, "materialize", "pkg00", dest, "--link", "hardlink",
                           env={"CASMIG_FAULT": "link@1=ENOENT"})
    strip = lambda sn: {k: (v[0], v[2], v[3]) for k, v in sn.items()}  # noqa: E731
    expect(code == 0 and strip(snapshot(dest)) == strip(pristine["pkg00"]), f"materialized anyway: {code} {err}")
    expect(os.lstat(os.path.join(dest, "LICENSE")).st_nlink == 2, "the file whose link failed is a copy "
           "(its in-package hard link LICENSE.copy makes 2)")


@test
@with_seams
def a_rerun_continues_where_a_killed_run_stopped(t):
    s, pristine = migrated_raw(t, "resume", packages=12)
    total = len(objects_by_form(s)[0])
    code, _, _ = t.run(s, "convert", "--compress", env={"CASMIG_CRASH_AT": "convert.recorded@60"})
    expect(code == -9, f"killed after 60 shards that changed: {code}")
    done = len(objects_by_form(s)[1])
    # A nightly batch whose budget is spent starts no shard and keeps the cursor for the next run.
    r = t.json(s, "convert", "--compress", "--time-budget", "0s")
    expect(r["stopped_by_time_budget"] and r["objects"] == 0 and len(objects_by_form(s)[1]) == done,
           f"a spent budget converts nothing: {r}")
    r = t.json(s, "convert", "--compress")
    expect(r["converted"] == len(objects_by_form(s)[1]) - done and r["failed"] == 0, f"the rest is converted: {r}")
    expect(done > 0 and r["objects"] < total - done, f"the rerun starts at the shard it stopped in, it does not read "
                                                     f"the earlier shards' raw objects again: {r}, {total} objects")
    expect(not set(objects_by_form(s)[0]) & {z[:65] for z in objects_by_form(s)[1]}, "one form per object")
    st = t.json(s, "status")
    expect(st["stored_bytes"] == on_disk_bytes(s), f"stored bytes right after a resumed run: {st['stored_bytes']}")
    # A later run starts from the first shard again (the cursor is gone).
    r = t.json(s, "convert", "--compress")
    expect(r["objects"] == total and r["converted"] == 0, f"a new run looks at every shard: {r}")
    t.run(s, "verify", "--objects", code=0)


def crash_points(t, store, args):
    d = store + "-discover"
    shutil.copytree(store, d, symlinks=True)
    trace = d + ".trace"
    t.run(d, *args, code=0, env={"CASMIG_CRASH_TRACE": trace})
    points = []
    for p in open(trace).read().split():
        if p not in points:
            points.append(p)
    shutil.rmtree(d)
    return points


def crash_everywhere(t, make_base, args, must_reach):
    base, pristine = make_base()
    points = crash_points(t, base, args)
    for p in must_reach:
        expect(p in points, f"crash point {p} is reached: {points}")
    failures = []
    for point in points:
        mine = point.startswith("convert.") or point.startswith("packages.")
        for mode in ("kill", "power-data", "power-names") if mine else ("kill",):
            c = os.path.join(t.work, f"crash-{args[1]}-{point}-{mode}")
            shutil.copytree(base, c, symlinks=True)
            env = {"CASMIG_CRASH_AT": point, "CASMIG_CRASH_MODE": mode, "CASMIG_CRASH_ROOT": c}
            code, _, err = t.run(c, *args, env=env)
            if code != -9:
                failures.append(f"{point}/{mode}: did not crash ({code}: {err.strip()[-200:]})")
                continue
            tag = f"{point}-{mode}"
            # Other commands first: nothing is missing while both forms may be on disk.
            code, _, err = t.run(c, "verify", "--objects")
            if code != 0:
                failures.append(f"{tag}: verify --objects after the crash exited {code}: {err.strip()[-300:]}")
            failures += [f"{tag}: {x}" for x in materialize_is_exact(t, c, pristine, "crashed")]
            code, _, err = t.run(c, *args)
            if code != 0:
                failures.append(f"{tag}: the rerun exited {code}: {err.strip()[-300:]}")
                continue
            raw, zst, _ = objects_by_form(c)
            left = zst if args[1] == "--raw" else [r for r in raw if r + ".zst" in set(zst)]
            if left:
                failures.append(f"{tag}: old forms left after the rerun: {left[:3]}")
            st = t.json(c, "status")
            if st["stored_bytes"] != on_disk_bytes(c):
                failures.append(f"{tag}: status stored_bytes {st['stored_bytes']} != {on_disk_bytes(c)} on disk")
            code, _, err = t.run(c, "verify", "--objects")
            if code != 0:
                failures.append(f"{tag}: verify --objects after the rerun exited {code}: {err.strip()[-300:]}")
            code, _, err = t.run(c, "rollback")
            if code != 0:
                failures.append(f"{tag}: rollback exited {code}: {err.strip()[-300:]}")
            for p, snap in pristine.items():
                if snapshot(os.path.join(c, p), owners=True) != snap:
                    failures.append(f"{tag}: rollback of {p} is not exact")
            subprocess.run(["rm", "-rf", c])
    expect(not failures, "\n".join(failures[:12]))


def cleaned(t, name, *migrate_args):
    """A store migrated (with migrate_args), cut over and cleaned up: the objects are the only copy."""
    s = compressible_store(t, name, packages=4)
    pristine = pristine_of(s)
    for args in (["migrate", *migrate_args], ["cutover"], ["cleanup"]):
        t.run(s, *args, code=0)
    return s, pristine


@test
@with_seams
def crash_at_every_step_of_convert_compress(t):
    crash_everywhere(t, lambda: cleaned(t, "crash-z"), ["convert", "--compress"],
                     ["convert.dict-staged", "convert.dict-renamed", "convert.dict-written",
                      "convert.compression-recorded", "publish.staged-durable", "convert.placed", "convert.unlinked",
                      "convert.unlinks-durable", "convert.recorded", "convert.done"])


@test
@with_seams
def crash_at_every_step_of_convert_raw(t):
    crash_everywhere(t, lambda: cleaned(t, "crash-r", "--compress"), ["convert", "--raw"],
                     ["convert.mode-cleared", "publish.staged-durable", "convert.placed", "convert.unlinked",
                      "convert.unlinks-durable", "convert.recorded", "convert.done"])


@test
@with_seams
def migrate_after_a_killed_convert_writes_the_new_form(t):
    s, pristine = migrated_raw(t, "intent", packages=4)
    code, _, _ = t.run(s, "convert", "--compress", env={"CASMIG_CRASH_AT": "convert.compression-recorded"})
    expect(code == -9, f"killed: {code}")
    expect(setting(s) and not objects_by_form(s)[1], "the mode is recorded before any object is converted")
    harness.put(os.path.join(s, "pkgnew"), "index.js", b"module.exports = function () { return 42 }\n" * 50)
    t.run(s, "migrate", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == 5, "sanity: pkgnew migrated")
    expect(len(objects_by_form(s)[1]) == 1, f"the new package's object is .zst: {objects_by_form(s)[1]}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-convert"))
