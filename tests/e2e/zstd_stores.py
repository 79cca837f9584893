"""Stores for the zstd tests (test_compress.py, test_convert.py): npm-like packages that compress, and
helpers that look at objects/ and the catalog. A module of its own: importing a test_*.py file would
register its tests a second time."""
import os
import random
import sqlite3
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import put  # noqa: E402

WORDS = ("module exports require function return const var let this that value index default object "
         "string number length prototype undefined null true false import from async await promise then "
         "catch error message name version license dependencies main files scripts test build").split()


def text(rng, n):
    out = []
    size = 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return (" ".join(out)[:n]).encode()


def compressible_store(t, name, packages=24, big=False):
    """Packages that look like npm's: many small text files (package.json, sources, README), a binary
    blob that does not compress, optionally one large compressible and one large incompressible file."""
    root = os.path.join(t.work, name)
    os.makedirs(root)
    rng = random.Random(name)
    for i in range(packages):
        p = os.path.join(root, f"pkg{i:02d}")
        put(p, "package.json", b'{"name": "pkg%d", "version": "1.%d.0", "license": "MIT", "main": "index.js"}\n' % (i, i))
        put(p, "LICENSE", b"MIT License\n\nPermission is hereby granted, free of charge, to any person\n" * 8)
        for j in range(24):
            put(p, f"lib/m{j}.js", text(rng, rng.randint(40, 6000)))
        put(p, "README.md", text(rng, 20000 + i))
        put(p, "bin/tool", os.urandom(3000 + i), 0o755)
        put(p, "share/empty", b"")
        put(p, "tiny.txt", b"hi\n")
        os.makedirs(os.path.join(p, "share/empty-dir"))
        os.symlink("tool", os.path.join(p, "bin/alias"))
        os.link(os.path.join(p, "LICENSE"), os.path.join(p, "LICENSE.copy"))
    if big:
        put(os.path.join(root, "pkg00"), "data/big.txt", text(rng, 9 << 20))
        put(os.path.join(root, "pkg01"), "data/big.bin", os.urandom(9 << 20))
    return root


def objects_by_form(store):
    raw, zst, other = [], [], []
    for d in os.listdir(os.path.join(store, "objects")):
        for n in os.listdir(os.path.join(store, "objects", d)):
            rel = f"{d}/{n}"
            if len(n) == 62:
                raw.append(rel)
            elif len(n) == 66 and n.endswith(".zst"):
                zst.append(rel)
            else:
                other.append(rel)
    return raw, zst, other


def setting(store):
    db = sqlite3.connect(f"file:{os.path.join(store, 'store.db')}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM settings WHERE key='compression'").fetchone()
        return row[0] if row else None
    finally:
        db.close()


def package_of(store, rel):
    """The packages whose manifest names the object objects/<rel>."""
    digest = bytes.fromhex(rel[:2] + rel[3:65])
    db = sqlite3.connect(f"file:{os.path.join(store, 'store.db')}?mode=ro", uri=True)
    try:
        return sorted(r[0].decode() for r in db.execute(
            "SELECT DISTINCT p.name FROM entries e JOIN packages p ON p.id=e.package WHERE e.digest=?", (digest,)))
    finally:
        db.close()


def damage(store, rel, how):
    path = os.path.join(store, "objects", rel)
    os.chmod(path, 0o644)
    data = open(path, "rb").read()
    if how == "flip":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1:]
    elif how == "truncate":
        data = data[:len(data) - 5]
    elif how == "trailing":
        data = data + b"\0garbage"
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o444)
