#!/usr/bin/env python3
"""Smoke test of tools/make-scale-store (the synthetic stores of tools/bench --scale), at 1,000 files:
exactly N files, the same tree from the same seed whatever the number of writer processes, another tree
from another seed, the shape the docstring promises (path depth 1-6, 64-hex package ids, duplicates),
the summary's distinct-content count equal to what casmig migrate stores, and --new-package adding one
package of --files files that shares contents with the store (as an upgrade does)."""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GEN = os.path.join(ROOT, "tools", "make-scale-store")
FILES = 1000
SEED = 3  # a seed whose 1,000 files hold several versions of one family (checked below)


def gen(*args):
    p = subprocess.run([GEN, *args, "--json"], capture_output=True, text=True)
    assert p.returncode == 0, f"make-scale-store {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}"
    return json.loads(p.stdout)


def tree(root):
    """{relative path: (mode, digest)} of every entry under root; raises on anything but files and dirs."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                raise AssertionError(f"symlink in a generated store: {rel}")
            if n in files:
                with open(full, "rb") as f:
                    out[rel] = (st.st_mode, hashlib.blake2b(f.read()).hexdigest())
            else:
                out[rel] = (st.st_mode, None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--casmig", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="casmig-scale-smoke-") as tmp:
        one, two, other = (os.path.join(tmp, d) for d in ("one", "two", "other"))
        s1 = gen(one, str(FILES), "--seed", str(SEED), "--jobs", "2")
        s2 = gen(two, "1k", "--seed", str(SEED), "--jobs", "1")
        gen(other, "200", "--seed", str(SEED + 1))
        t1, t2, t3 = tree(one), tree(two), tree(other)
        assert t1 == t2, "the same seed gave two different trees (with 2 and 1 writer processes)"
        assert not set(t1) & set(t3), "seeds 3 and 4 gave packages of the same ids"
        empty = hashlib.blake2b(b"").hexdigest()
        assert not {d for _, d in t1.values() if d} & {d for _, d in t3.values() if d} - {empty}, \
            "seeds 3 and 4 gave the same contents"

        files = {p: d for p, (mode, d) in t1.items() if d is not None}
        assert len(files) == FILES == s1["files"], f"{len(files)} files written, summary {s1['files']}, asked {FILES}"
        assert s1 == {**s2, "dest": s1["dest"], "seconds": s1["seconds"]}, f"summaries differ: {s1} {s2}"
        packages = {p.split("/")[0] for p in files}
        assert len(packages) == s1["packages"] >= 3, f"{len(packages)} packages, summary {s1['packages']}"
        assert all(re.fullmatch(r"[0-9a-f]{64}", p) for p in packages), f"package ids: {sorted(packages)[:3]}"
        depths = {p.count("/") for p in files}  # 1 = directly in the package root
        assert depths <= set(range(1, 7)) and len(depths) >= 4, f"path depths {sorted(depths)}"
        distinct = set(files.values())
        assert len(distinct) == s1["distinct_contents"], \
            f"{len(distinct)} distinct contents written, summary says {s1['distinct_contents']}"
        dup_share = 1 - len(distinct) / FILES
        assert 0.2 < dup_share < 0.8, f"duplicate files {dup_share:.0%}: versions of a family share contents"
        modes = {m for p, (m, d) in t1.items() if d is not None}
        assert modes == {0o100644, 0o100755}, f"file modes {sorted(oct(m) for m in modes)}: 0644 and a few 0755"

        new = gen(one, str(FILES), "--seed", str(SEED), "--new-package", "0", "--files", "50")
        added = {p: d for p, (m, d) in tree(one).items() if d is not None and p.startswith(new["package"] + "/")}
        assert len(added) == 50 and new["package"] not in packages, f"new package: {len(added)} files"
        shared = set(added.values()) & distinct
        assert 0 < len(shared) < 50, f"the new package shares {len(shared)} of 50 contents with the store"
        # a small store has fewer families of 50+ files than K + 1: later versions of the same ones
        ids = {new["package"], gen(one, str(FILES), "--seed", str(SEED), "--new-package", "2", "--files",
                                   "50")["package"]}
        assert len(ids) == 2 and not ids & packages, f"--new-package 0 and 2 gave {len(ids)} new packages"
        added = {p: d for p, (m, d) in tree(one).items() if d is not None and p.split("/")[0] in ids}

        p = subprocess.run([a.casmig, "--store", one, "--json", "migrate"], capture_output=True, text=True)
        assert p.returncode == 0, f"casmig migrate of a generated store exited {p.returncode}: {p.stderr.strip()}"
        m = json.loads(p.stdout)
        want = len(distinct | set(added.values()))
        assert m["files"] == FILES + 100 and m["new_objects"] == want and m["failed"] == 0, \
            f"migrate: {m['files']} files, {m['new_objects']} objects; expected {FILES + 100}, {want}"
    print("make-scale-store: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
