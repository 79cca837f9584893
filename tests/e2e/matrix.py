"""Shared pieces of the crash matrix (test_crash.py) and the fault matrix (test_faults.py).

A small store holding every kind of entry casmig must keep exactly (shared files, an empty file, a
symlink, an executable, a hard-link pair, a nested directory, files above the O_DIRECT threshold, sparse
files on both ingest paths, a hard link across two packages), its
lifecycle states (legacy, migrated, cutover, cleaned, removed), and the invariants a user relies on
after any crash or fault followed by any command:

  * every object under objects/ hashes (BLAKE3) to its name;
  * no package is lost: each pristine package is either present as an exact legacy tree or materializes
    exactly (content, modes, symlinks, mtimes, hard links); materialize never exits 0 with wrong bytes;
  * a legacy tree at a package's name is exact (trees are renamed into place whole, never half-made);
  * a package the catalog says is verified materializes exactly; after a command that exited 0, a
    package whose legacy tree the catalog says is present has one;
  * after a rollback that exited 0, the hard link across packages (XLINK) is one inode again;
  * after a locked command that finished (exit 0 or 1), temp/ holds nothing;
  * a command exits 0, 1 (finished, something failed) or 3 (refused), its stderr one line per problem,
    never a stack trace.
"""
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

PACKAGES = ["pkg00", "pkg01", "pkg02", "pkg03"]
GONE_PACKAGE = "pkg03"  # what `remove` removes (and what gc then collects)
XLINK = [("pkg01", "lib/libx.so.1"), ("pkg02", "lib/libx-shared.so")]  # one inode in two packages
LOCKED = {"migrate", "verify", "cutover", "cleanup", "rollback", "remove", "gc", "rebuild-catalog", "convert", "add"}
ADDED = "pkgnew"  # what `add` adds from Pristine.staging (no legacy tree ever)
CRASH_MARKERS = ("terminate called", "what():", "Traceback", "Assertion", "Aborted", "core dumped",
                 "AddressSanitizer", "runtime error:", "Segmentation")


def _rand(seed, n):
    """Deterministic bytes (the store is the same on every run: reproductions replay exactly)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def build_pristine(root):
    os.makedirs(root)
    put = harness.put
    shared_big = _rand("shared-big", 200 * 1024)  # > 64 KiB: the O_DIRECT path, shared by two packages
    for i, name in enumerate(PACKAGES):
        p = os.path.join(root, name)
        put(p, "LICENSE", b"shared license text\n" * 30)
        put(p, f"bin/tool{i}", _rand(f"tool{i}", 3000 + i), 0o755)
        put(p, "share/empty", b"")
        os.makedirs(os.path.join(p, "share/empty-dir"))
        os.symlink(f"tool{i}", os.path.join(p, "bin/alias"))
        if name == "pkg00":
            put(p, "docs/a.txt", b"one inode, two names\n")
            os.link(os.path.join(p, "docs/a.txt"), os.path.join(p, "docs/b-hardlink.txt"))
            put(p, "deep/er/and/deeper/leaf.conf", b"nested = true\n", 0o600)
            put(p, "data/big.bin", shared_big)
            os.symlink("/nonexistent/absolute/target", os.path.join(p, "dangling"))
        if name == "pkg01":
            put(p, "data/big.bin", shared_big)
            put(p, "data/own-big.bin", _rand("own-big", 130 * 1024 + 7))
            put(p, "lib/libx.so.1", _rand("libx", 9000), 0o755)
            # Sparse: read whole (under 8 MiB) and streamed (over), each ending in a hole.
            _sparse(os.path.join(p, "data/sparse-small.img"), 3 << 20, [(0, 5000), (1 << 20, 70 * 1024)])
            _sparse(os.path.join(p, "data/sparse-big.img"), 12 << 20, [(4096, 9000), (9 << 20, 200 * 1024 + 3)])
        if name == "pkg02":
            for k in range(6):
                put(p, f"many/f{k}.txt", _rand(f"many{k}", 100 + k * 37))
            os.makedirs(os.path.join(p, "lib"))
            os.link(os.path.join(root, *XLINK[0]), os.path.join(root, XLINK[1][0], XLINK[1][1]))
        if name == "pkg03":
            put(p, "unique.dat", _rand("only-in-pkg03", 70 * 1024))


def _sparse(path, size, pieces):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in pieces:
            f.seek(off)
            f.write(_rand(f"sparse{off}", n))


def snap(tree):
    """harness.snapshot plus hard-link groups (rollback and materialize keep links inside a package)."""
    s = harness.snapshot(tree)
    groups = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in filenames:
            fp = os.path.join(dirpath, n)
            st = os.lstat(fp)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append(os.path.relpath(fp, tree))
    return s, sorted(sorted(g) for g in groups.values() if len(g) > 1)


def diff(a, b):
    """One short line saying how snapshot b differs from a (None when equal)."""
    if a == b:
        return None
    (sa, la), (sb, lb) = a, b
    missing = sorted(set(sa) - set(sb))
    extra = sorted(set(sb) - set(sa))
    changed = sorted(k for k in set(sa) & set(sb) if sa[k] != sb[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"extra {extra[:3]}")
    if changed:
        k = changed[0]
        parts.append(f"changed {changed[:3]} (e.g. {k}: {sa[k]} -> {sb[k]})")
    if la != lb:
        parts.append(f"hard links {la} -> {lb}")
    return "; ".join(parts)


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASMIG_")}
    env.update(extra or {})
    return env


def run(casmig, store, args, env=None, timeout=120):
    cmd = [casmig, "--store", store] + list(args)
    try:
        p = subprocess.run(cmd, capture_output=True, env=clean_env(env), stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {timeout}s"
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def copy_tree(src, dst):
    subprocess.run(["cp", "-a", src, dst], check=True)


def remove_tree(path):
    if os.path.lexists(path):
        subprocess.run(["chmod", "-R", "u+rwX", path], stderr=subprocess.DEVNULL)
        shutil.rmtree(path, ignore_errors=True)


def stderr_problems(code, err):
    """What is wrong with a command's exit code and stderr, as a user sees it (empty list when fine)."""
    out = []
    if code is None:
        out.append(err)
        return out
    if code < 0:
        out.append(f"died by signal {-code}")
    elif code not in (0, 1, 3):
        out.append(f"exit {code} (expected 0, 1 or 3)")
    for m in CRASH_MARKERS:
        if m in err:
            out.append(f"stderr holds {m!r}")
    lines = [l for l in err.splitlines() if l.strip()]
    if code not in (0, None) and code > 0 and not lines:
        out.append(f"exit {code} without a word on stderr")
    for l in lines:
        if len(l) > 600:
            out.append(f"stderr line of {len(l)} chars")
            break
        # An error names where: a path or a package.
        if "error" in l.lower() and "/" not in l and "pkg" not in l and "store" not in l:
            out.append(f"stderr line names no path or package: {l!r}")
    return out


def bad_objects(store):
    """Objects whose content does not hash to their name (b3sum, one batch call)."""
    objdir = os.path.join(store, "objects")
    files = []
    if os.path.isdir(objdir):
        for fan in sorted(os.listdir(objdir)):
            d = os.path.join(objdir, fan)
            if len(fan) != 2 or not os.path.isdir(d) or os.path.islink(d):
                continue
            for n in sorted(os.listdir(d)):
                files.append(f"{fan}/{n}")
    checked = [f for f in files if len(f) >= 65 and not f.endswith(".zst")]
    if not checked:
        return []
    p = subprocess.run(["b3sum", "--no-mmap", "--"] + checked, cwd=objdir, capture_output=True, text=True)
    bad = []
    got = {}
    for line in p.stdout.splitlines():
        h, _, name = line.partition("  ")
        got[name] = h
    for f in checked:
        want = f[:2] + f[3:65]
        if got.get(f) != want:
            bad.append(f"objects/{f} hashes to {got.get(f, 'unreadable')[:16]}…")
    return bad


def bad_manifests(store):
    """packages/: manifest objects that do not hash to their name, refs that name no sound manifest."""
    base = os.path.join(store, "packages", "manifests")
    files = []
    if os.path.isdir(base):
        for fan in sorted(os.listdir(base)):
            d = os.path.join(base, fan)
            if os.path.isdir(d):
                files += [f"{fan}/{n}" for n in sorted(os.listdir(d))]
    got = {}
    if files:
        p = subprocess.run(["b3sum", "--no-mmap", "--"] + files, cwd=base, capture_output=True, text=True)
        for line in p.stdout.splitlines():
            h, _, name = line.partition("  ")
            got[name] = h
    bad = [f"packages/manifests/{f} hashes to {got.get(f, 'unreadable')[:16]}…" for f in files
           if got.get(f) != f[:2] + f[3:]]
    refs = os.path.join(store, "packages", "refs")
    if os.path.isdir(refs):
        for n in sorted(os.listdir(refs)):
            text = open(os.path.join(refs, n), "rb").read()
            name = text[:64].decode(errors="replace")
            if len(text) != 65 or got.get(f"{name[:2]}/{name[2:]}") != name:
                bad.append(f"packages/refs/{n} names no sound manifest ({text[:20]!r})")
    return bad


def catalog_states(store):
    """{package: (state, tree)} from store.db (read-only), {} when there is no catalog; None when unreadable."""
    db = os.path.join(store, "store.db")
    if not os.path.exists(db):
        return {}
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        rows = c.execute("SELECT name, state, tree FROM packages").fetchall()
        c.close()
    except sqlite3.Error:
        return None
    return {os.fsdecode(n) if isinstance(n, bytes) else n: (st, tree) for n, st, tree in rows}


def materialize(casmig, store, pkg, dest):
    code, _, err = run(casmig, store, ["materialize", pkg, dest])
    return code, err


class Pristine:
    """The store's states, built once per test process and copied (cp -a) for every case."""

    def __init__(self, casmig, work):
        self.casmig, self.work = casmig, work
        self.states = {}
        legacy = os.path.join(work, "state-legacy")
        build_pristine(legacy)
        self.snaps = {p: snap(os.path.join(legacy, p)) for p in PACKAGES}
        # The package manager's staging directory for `add`: content shared with the store's packages
        # (dedup against objects already there), its own content, a symlink, an executable, an empty
        # directory.
        self.staging = os.path.join(work, "staging-" + ADDED)
        put = harness.put
        put(self.staging, "LICENSE", b"shared license text\n" * 30)
        put(self.staging, "bin/new-tool", _rand("new-tool", 5000), 0o755)
        put(self.staging, "data/new-big.bin", _rand("new-big", 150 * 1024 + 11))
        os.makedirs(os.path.join(self.staging, "share/empty-dir"))
        os.symlink("new-tool", os.path.join(self.staging, "bin/alias"))
        self.snaps[ADDED] = snap(self.staging)
        self.states["legacy"] = legacy
        steps = [("migrated", "legacy", ["migrate"]), ("cutover", "migrated", ["cutover"]),
                 ("cleaned", "cutover", ["cleanup"]), ("removed", "cleaned", ["remove", GONE_PACKAGE]),
                 ("converted", "cleaned", ["convert", "--compress"])]
        for name, base, args in steps:
            d = os.path.join(work, f"state-{name}")
            copy_tree(self.states[base], d)
            code, out, err = run(casmig, d, args)
            if code != 0:
                raise AssertionError(f"building state {name}: casmig {' '.join(args)} exited {code}: {err.strip()[-400:]}")
            self.states[name] = d
        # "lost": after cleanup, store.db deleted: packages/ and objects/ are all there is (rebuild-catalog).
        d = os.path.join(work, "state-lost")
        copy_tree(self.states["cleaned"], d)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(os.path.join(d, "store.db" + suffix)):
                os.remove(os.path.join(d, "store.db" + suffix))
        self.states["lost"] = d

    def expected(self, state, command_args):
        """(packages that must survive, packages that may be gone) for a case run from `state`."""
        must, may = list(PACKAGES), []
        if state == "removed":
            must.remove(GONE_PACKAGE)
        elif command_args[:1] == ["remove"]:
            must.remove(command_args[1])
            may.append(command_args[1])
        if command_args[:1] == ["add"]:
            may.append(ADDED)  # added whole, or not at all
        return must, may


def check_store(casmig, store, pristine, must, may, scratch, after=None, after_code=None):
    """Every invariant of the module docstring; returns a list of one-line problems."""
    problems = []
    os.makedirs(scratch, exist_ok=True)
    problems += bad_objects(store)
    problems += bad_manifests(store)
    temp = os.path.join(store, "temp")
    if after in LOCKED and after_code in (0, 1) and os.path.isdir(temp) and os.listdir(temp):
        problems.append(f"temp/ not empty after {after} exited {after_code}: {sorted(os.listdir(temp))[:4]}")
    states = catalog_states(store)
    if states is None:
        problems.append("store.db cannot be read")
        states = {}
    for pkg in must + may:
        want = pristine.snaps[pkg]
        tree = os.path.join(store, pkg)
        tree_ok = False
        tree_diff = "absent"
        if os.path.lexists(tree):
            tree_diff = diff(want, snap(tree)) if os.path.isdir(tree) and not os.path.islink(tree) else "not a directory"
            tree_ok = tree_diff is None
        dest = os.path.join(scratch, f"mat-{pkg}")
        remove_tree(dest)
        code, err = materialize(casmig, store, pkg, dest)
        if code == 3 and "rebuild-catalog" in err:
            # The catalog does not fit the store (lost, or a crash mid-rebuild): the package is safe if the
            # documented way back recovers it. Tried on a copy, so the store under test stays as it is.
            rebuilt = os.path.join(scratch, "rebuilt")
            if not os.path.exists(rebuilt):
                copy_tree(store, rebuilt)
                rcode, _, rerr = run(casmig, rebuilt, ["rebuild-catalog"])
                if rcode != 0:
                    problems.append(f"rebuild-catalog on a copy exited {rcode}: {rerr.strip()[-200:]}")
            code, err = materialize(casmig, rebuilt, pkg, dest)
        mat_ok = False
        mat_diff = f"materialize exit {code}: {err.strip()[:200]}"
        if code == 0:
            mat_diff = diff(want, snap(dest))
            mat_ok = mat_diff is None
            if not mat_ok:
                problems.append(f"{pkg}: materialize exited 0 with a wrong tree: {mat_diff}")
        elif code is not None and code < 0 or any(m in err for m in CRASH_MARKERS):
            problems.append(f"{pkg}: materialize crashed: {err.strip()[:200]}")
        remove_tree(dest)
        if os.path.lexists(tree) and not tree_ok:
            # Trees are built aside, made durable, then renamed into place whole; these stores have no
            # drift: anything at a package's name that is not its exact tree was put there half-made.
            problems.append(f"{pkg}: the legacy tree at its name is not exact: {tree_diff}")
        state, tree_state = states.get(pkg, (None, None))
        if after in LOCKED and after_code == 0 and tree_state == "present" and not os.path.isdir(tree):
            # A command that completed leaves no record the disk does not back (nothing here moves trees
            # behind casmig's back).
            problems.append(f"{pkg}: the catalog says its legacy tree is present after {after} exited 0, "
                            f"but there is none")
        if state == "verified" and not mat_ok:
            # Readers use a verified package's manifest: it must be whole (objects durable, named right).
            problems.append(f"{pkg}: the catalog says verified but it does not materialize exactly: {mat_diff}")
        if pkg in may and not os.path.lexists(tree) and code != 0:
            continue  # removed entirely: fine for the package being removed
        if not tree_ok and not mat_ok:
            problems.append(f"{pkg} LOST: legacy tree {tree_diff}; {mat_diff}")
        if after == "rollback" and after_code == 0 and pkg in must and not tree_ok:
            problems.append(f"{pkg}: rollback exited 0 but the legacy tree is not exact: {tree_diff}")
        if after == "add" and after_code == 0 and not mat_ok:
            problems.append(f"{pkg}: add exited 0 but {pkg} does not materialize exactly: {mat_diff}")
        if after == "migrate" and after_code == 0 and pkg in must and not mat_ok:
            problems.append(f"{pkg}: migrate exited 0 but the package does not materialize exactly: {mat_diff}")
    if after == "rollback" and after_code == 0 and all(pk in must for pk, _ in XLINK):
        ids = set()
        for pk, rel in XLINK:
            st = os.lstat(os.path.join(store, pk, rel)) if os.path.lexists(os.path.join(store, pk, rel)) else None
            ids.add((st.st_dev, st.st_ino) if st else None)
        if len(ids) != 1:
            problems.append(f"rollback exited 0 but {XLINK[0][0]}/{XLINK[0][1]} and {XLINK[1][0]}/{XLINK[1][1]} are "
                            f"not one inode again")
    return problems


def seams_enabled(casmig):
    """True when casmig was built with -Dtest_seams=true (a migrate leaves a CASMIG_FAULT_TRACE)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="casmig-seams-")
    try:
        store = os.path.join(d, "store")
        harness.put(os.path.join(store, "p"), "f", b"x")
        trace = os.path.join(d, "trace")
        run(casmig, store, ["migrate"], env={"CASMIG_FAULT_TRACE": trace})
        return os.path.exists(trace)
    finally:
        remove_tree(d)


def skip_without_seams(argv):
    """Exit 77 (meson: skipped) when the binary has no test seams: these matrices need them."""
    if "--casmig" in argv:
        casmig = os.path.abspath(argv[argv.index("--casmig") + 1])
        if os.path.exists(casmig) and not seams_enabled(casmig):
            print(f"SKIP: {casmig} was built without -Dtest_seams=true (tools/build turns it on)")
            sys.exit(77)
