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


if __name__ == "__main__":
    sys.exit(harness.main("e2e-edges"))
