#!/usr/bin/env python3
"""Edges of the input: very deep trees under a low open-file limit, out-of-range option values, a
materialize destination inside the store."""
import os
import resource
import subprocess
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

sys.setrecursionlimit(20000)  # os.walk recurses once per level of the deep trees below


def limited(n):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def make_deep(root, levels):
    """root/d/d/.../d, a file at every level (each in a directory of its own), a symlink at the bottom."""
    os.makedirs(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(levels):
        f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, f"level {i}\n".encode())
        os.close(f)
        os.mkdir("d", 0o755, dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.symlink("../f", "up", dir_fd=fd)
    os.close(fd)


@test
def deep_package_under_a_low_open_file_limit(t):
    # 1,000 levels with a file at each: the walker, the pipeline's units and verify must all stay
    # within 128 open files (the walker used to keep one fd per level: EMFILE).
    s = t.store("deep", 2, lambda root: make_deep(os.path.join(root, "deep"), 1000))
    for args in (["migrate"], ["verify"], ["-j", "4", "verify"]):
        p = subprocess.run([t.casmig, "--store", s] + args, capture_output=True, text=True, preexec_fn=limited(128),
                           timeout=300)
        expect(p.returncode == 0, f"{' '.join(args)} under 128 open files: exit {p.returncode}: {p.stderr[-400:]}")
    expect(t.json(s, "status")["packages"]["verified"] == 3, "not every package verified")
    dest = os.path.join(t.work, "deep-out")
    p = subprocess.run([t.casmig, "--store", s, "materialize", "deep", dest], capture_output=True, text=True,
                       preexec_fn=limited(128), timeout=300)
    expect(p.returncode == 0, f"materialize under 128 open files: exit {p.returncode}: {p.stderr[-400:]}")
    want, got = snapshot(os.path.join(s, "deep")), snapshot(dest)
    expect(len(want) == 2001, f"the test tree has {len(want)} entries")
    expect(got == want, f"materialized tree differs: {len(set(want.items()) ^ set(got.items()))} entries")



@test
def out_of_range_options_are_usage_errors(t):
    s = t.store("options", 2)
    before = snapshot(s)
    cases = [
        (["migrate", "--time-budget", "99999999999999999999999d"], "3650d"),  # overflowed to 0 before
        (["migrate", "--io-limit", "0.4"], "1 to 1024T"),                     # rounded to 0 = unlimited
        (["migrate", "--io-limit", "0.5"], "1 to 1024T"),                     # rounded to 1 B/s
        (["migrate", "--io-limit", "0"], "1 to 1024T"),
        (["migrate", "--limit", "0"], "from 1 to 1000000000"),                # printed a 300-digit number
        (["plan", "--limit", "99999999999999999999"], "from 1 to 1000000000"),
        (["verify", "--sample", "0"], "from 1 to 1000000000"),
        (["status", "--journal", "-5"], "from 0 to 1000000"),                 # -5 showed the whole journal
        (["-j", "0", "status"], "1 to 1024"),
    ]
    for args, rng in cases:
        code, out, err = t.run(s, *args)
        lines = err.strip().splitlines()
        expect(code == 2, f"{' '.join(args)}: exit {code}, expected 2; stderr {err!r}")
        expect(len(lines) == 1 and rng in lines[0] and len(lines[0]) < 200,
               f"{' '.join(args)}: expected one line naming the range {rng!r}, got {err!r}")
    expect(snapshot(s) == before, "a refused command changed the store")
    t.run(s, "migrate", "--limit", "1", "--time-budget", "3650d", "--io-limit", "1024T", code=0)
    t.run(s, "status", "--journal", "0", code=0)
    expect(t.json(s, "status")["packages"]["verified"] == 1, "--limit 1 did not migrate exactly one package")



@test
def materialize_refuses_a_destination_inside_the_store(t):
    s = t.store("matin", 2)
    t.run(s, "migrate", code=0)
    link = os.path.join(t.work, "into-objects")
    os.symlink(os.path.join(s, "objects"), link)
    os.symlink(s, os.path.join(t.work, "into-store"))
    def tree():  # the store minus the catalog's files, which any read-only open may touch
        return {k: v for k, v in snapshot(s).items() if not k.startswith((b"store.db", b"migration"))}
    before = tree()
    dests = [os.path.join(s, "objects", "x"), os.path.join(s, "temp", "x"), os.path.join(s, "newpkg"),
             os.path.join(s, "objects", "..", "newpkg2"), os.path.join(link, "x"), link,
             os.path.join(t.work, "into-store"), os.path.join(s, "pkg00", "bin", "x")]
    for dest in dests:
        code, out, err = t.run(s, "materialize", "pkg00", dest)
        lines = err.strip().splitlines()
        expect(code == 2, f"materialize into {dest}: exit {code}, expected 2; stderr {err!r}")
        expect(len(lines) == 1 and "inside store" in lines[0], f"materialize into {dest}: {err!r}")
    after = tree()
    expect(after == before, f"a refused materialize changed the store: {sorted(set(after) ^ set(before))}")
    # Outside the store, also through a symlinked parent, it works.
    os.makedirs(os.path.join(t.work, "outside"))
    os.symlink(os.path.join(t.work, "outside"), os.path.join(t.work, "into-outside"))
    t.run(s, "materialize", "pkg00", os.path.join(t.work, "into-outside", "pkg00"), code=0)
    expect(snapshot(os.path.join(t.work, "outside", "pkg00")) == snapshot(os.path.join(s, "pkg00")), "materialized tree")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-edges"))
