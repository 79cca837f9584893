#!/usr/bin/env python3
"""The C library (include/casmig/casmig.h) driven from another language through ctypes, and the C
example client (tools/examples/pm.c), in-tree and built against an installed copy (meson install
--destdir + pkg-config). The library and example are found beside the casmig binary (--casmig)."""
import ctypes
import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import harness  # noqa: E402
from harness import test, put, expect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Entry(ctypes.Structure):
    _fields_ = [("path", ctypes.POINTER(ctypes.c_char)), ("path_len", ctypes.c_size_t), ("type", ctypes.c_int),
                ("mode", ctypes.c_uint32), ("size", ctypes.c_uint64), ("digest", ctypes.POINTER(ctypes.c_uint8)),
                ("target", ctypes.POINTER(ctypes.c_char)), ("target_len", ctypes.c_size_t)]


class MigrateResult(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("packages", "migrated", "verified", "failed", "files", "bytes",
                                                "new_objects", "new_object_bytes")]


class VerifyResult(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("packages", "ok", "mismatched")]


class StatusInfo(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_char_p)] + [(n, ctypes.c_uint64) for n in (
        "packages", "pending", "in_progress", "migrated", "verified", "failed", "rolled_back", "files",
        "logical_bytes", "objects", "stored_bytes")]


class Progress(ctypes.Structure):
    _fields_ = [("phase", ctypes.c_char_p)] + [(n, ctypes.c_uint64) for n in (
        "packages_done", "packages_total", "files_done", "bytes_done", "bytes_total")]


class AddResult(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("files", "bytes", "new_objects", "new_object_bytes")]


PROBLEM = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p)
PROGRESS = ctypes.CFUNCTYPE(None, ctypes.POINTER(Progress), ctypes.c_void_p)
ENTRY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Entry), ctypes.c_void_p)


def build_dir(t):
    return os.path.dirname(t.casmig)


class Lib:
    def __init__(self, path):
        self.c = ctypes.CDLL(path)
        c = self.c
        c.casmig_version.restype = ctypes.c_char_p
        c.casmig_last_error.restype = ctypes.c_char_p
        c.casmig_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        c.casmig_close.argtypes = [ctypes.c_void_p]
        c.casmig_migrate.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, PROGRESS,
                                     PROBLEM, ctypes.c_void_p, ctypes.POINTER(MigrateResult)]
        c.casmig_verify.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, PROBLEM,
                                    ctypes.c_void_p, ctypes.POINTER(VerifyResult)]
        c.casmig_status.argtypes = [ctypes.c_void_p, ctypes.POINTER(StatusInfo)]
        c.casmig_package_entries.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ENTRY, ctypes.c_void_p]
        c.casmig_open_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.POINTER(ctypes.c_int)]
        c.casmig_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, PROBLEM, ctypes.c_void_p,
                                 ctypes.POINTER(AddResult)]
        c.casmig_remove.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        c.casmig_materialize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        c.casmig_set_lock_wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64]

    def add(self, h, name, staging):
        problems = []
        cb = PROBLEM(lambda pkg, path, msg, warn, u: problems.append((pkg.decode(), path.decode(), msg.decode(), warn)))
        r = AddResult()
        rc = self.c.casmig_add(h, name.encode(), staging.encode(), cb, None, ctypes.byref(r))
        return rc, r, problems

    def error(self):
        return self.c.casmig_last_error().decode()

    def open(self, root):
        h = ctypes.c_void_p()
        rc = self.c.casmig_open(root.encode(), None, ctypes.byref(h))
        expect(rc == 0 and h.value, f"casmig_open: {rc} {self.error()}")
        return h

    def migrate(self, h, names, progress=None):
        problems = []
        arr = (ctypes.c_char_p * max(1, len(names)))(*[n.encode() for n in names])
        r = MigrateResult()
        cb = PROBLEM(lambda pkg, path, msg, warn, u: problems.append((pkg.decode(), path.decode(), msg.decode(), warn)))
        pcb = PROGRESS(lambda p, u: progress.append(p.contents.phase.decode())) if progress is not None else PROGRESS()
        rc = self.c.casmig_migrate(h, arr, len(names), pcb, cb, None, ctypes.byref(r))
        return rc, r, problems

    def entries(self, h, pkg):
        out = []

        def one(e, u):
            e = e.contents
            digest = bytes(e.digest[:32]).hex() if e.digest else None
            target = ctypes.string_at(e.target, e.target_len) if e.target else None
            out.append((ctypes.string_at(e.path, e.path_len).decode(), e.type, e.mode, e.size, digest, target))
            return 0
        rc = self.c.casmig_package_entries(h, pkg.encode(), ENTRY(one), None)
        return rc, out

    def read(self, h, pkg, path):
        fd = ctypes.c_int(-1)
        p = path.encode()
        rc = self.c.casmig_open_file(h, pkg.encode(), p, len(p), ctypes.byref(fd))
        if rc != 0:
            expect(fd.value == -1, "an fd handed out with a failure")
            return rc, None
        flags = fcntl.fcntl(fd.value, fcntl.F_GETFL)
        expect(flags & os.O_ACCMODE == os.O_RDONLY, f"{pkg}/{path}: fd is not read-only ({flags:o})")
        with os.fdopen(fd.value, "rb") as f:
            return rc, f.read()

    def status(self, h):
        st = StatusInfo()
        rc = self.c.casmig_status(h, ctypes.byref(st))
        expect(rc == 0, f"status: {rc} {self.error()}")
        return st


def lib_of(t):
    return Lib(os.path.join(build_dir(t), "libcasmig.so.0"))


def legacy_listing(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = os.lstat(p)
    return out


@test
def the_library_migrates_and_reads_a_package_in_dual_mode(t):
    lib = lib_of(t)
    expect(lib.c.casmig_version().decode() != "", "no version")
    s = t.store("capi", 3)
    h = lib.open(s)
    try:
        # Before migrate: entries come from the legacy tree, without digests; files from the tree.
        rc, es = lib.entries(h, "pkg00")
        expect(rc == 0 and es and all(e[4] is None for e in es), f"legacy entries: {rc} {es[:3]}")
        names = {e[0] for e in es} - {""}
        expect(names == set(legacy_listing(os.path.join(s, "pkg00"))), f"legacy entries differ: {names}")
        rc, data = lib.read(h, "pkg00", "bin/tool0")
        expect(rc == 0 and data == open(os.path.join(s, "pkg00", "bin", "tool0"), "rb").read(), "legacy read")
        phases = []
        rc, r, problems = lib.migrate(h, ["pkg00", "pkg01"], phases)
        expect(rc == 0 and r.migrated == 2 and r.verified == 2 and not problems, f"migrate: {rc} {r.migrated} {problems} {lib.error()}")
        expect("migrate" in phases, f"no progress reported: {set(phases)}")
        st = lib.status(h)
        expect(st.mode == b"dual" and st.verified == 2 and st.pending == 1 and st.packages == 3, f"status: {st.mode} {st.verified} {st.pending}")
        # The CLI sees the same store.
        expect(t.json(s, "status")["packages"]["verified"] == 2, "the CLI disagrees")
        rc, es = lib.entries(h, "pkg01")
        files = [e for e in es if e[1] == 1]
        expect(rc == 0 and files and all(e[4] and len(e[4]) == 64 for e in files), f"manifest entries: {es[:3]}")
        expect([e[0] for e in es] == sorted(e[0] for e in es), "entries not in path order")
        link = [e for e in es if e[1] == 3]
        expect(link and link[0][5] == b"tool1", f"symlink target: {link}")
        # After cleanup the file comes from the CAS (the legacy tree is gone).
        t.run(s, "migrate", code=0)
        t.run(s, "cutover", code=0)
        t.run(s, "cleanup", code=0)
        expect(not os.path.exists(os.path.join(s, "pkg01")), "cleanup left the tree")
        rc, data = lib.read(h, "pkg01", "bin/tool1")
        obj = [e for e in es if e[0] == "bin/tool1"][0]
        expect(rc == 0 and len(data) == obj[3], f"read from the CAS: {rc} {lib.error()}")
        t.run(s, "rollback", code=0)
        expect(open(os.path.join(s, "pkg01", "bin", "tool1"), "rb").read() == data, "the CAS read differs from the rebuilt file")
    finally:
        lib.c.casmig_close(h)


@test
def the_library_refuses_paths_that_leave_the_package_and_names_what_failed(t):
    lib = lib_of(t)
    s = t.store("capi-bad", 2, extra=lambda root: (
        os.symlink("../pkg01", os.path.join(root, "pkg00", "up")),
        put(os.path.join(root, "secret"), "key", b"not yours")))
    h = lib.open(s)
    try:
        for phase in ("legacy", "verified"):
            if phase == "verified":
                rc, r, problems = lib.migrate(h, ["pkg00"])
                expect(rc == 0 and r.verified == 1, f"migrate pkg00: {rc} {problems} {lib.error()}")
            for pkg, path in [("pkg00", "../pkg01/LICENSE"), ("pkg00", "up/LICENSE"), ("pkg00", "/etc/passwd"),
                              ("pkg00", "bin/../LICENSE"), ("pkg00", "share/empty-dir"), ("pkg00", "nope"),
                              ("pkg00", "bin/alias"), ("..", "secret/key"), ("pkg00/..", "secret/key")]:
                rc, data = lib.read(h, pkg, path)
                expect(rc == 2 and data is None and lib.error(), f"{phase} {pkg} {path}: {rc} {lib.error()!r}")
                if path == "nope":
                    expect("nope" in lib.error(), f"error does not name the path: {lib.error()!r}")
            rc, data = lib.read(h, "pkg00", "LICENSE")
            expect(rc == 0 and data == b"shared license\n" * 20, f"{phase}: a plain read: {rc} {lib.error()}")
        rc, _ = lib.entries(h, "no-such-package")
        expect(rc != 0 and "no-such-package" in lib.error(), f"unknown package: {rc} {lib.error()!r}")
        rc, r, problems = lib.migrate(h, ["no-such-package"])
        expect(rc == 2 and "no-such-package" in lib.error(), f"migrate unknown: {rc} {lib.error()!r}")
        # A package that cannot be migrated: CASMIG_FAILED, and the problem names package and path.
        os.mkfifo(os.path.join(s, "pkg01", "fifo"))
        rc, r, problems = lib.migrate(h, ["pkg01"])
        expect(rc == 1 and r.failed == 1 and any(p[0] == "pkg01" and "fifo" in p[1] + p[2] for p in problems),
               f"fifo: {rc} {problems}")
        # Busy: another process holds the store lock; the call returns at once.
        with open(os.path.join(s, "migration", "lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            rc, r, _ = lib.migrate(h, ["pkg00"])
            expect(rc == 4 and lib.error(), f"busy: {rc} {lib.error()!r}")
        rc, r, _ = lib.migrate(h, ["pkg00"])
        expect(rc == 0, f"after the lock: {rc} {lib.error()}")
    finally:
        lib.c.casmig_close(h)


@test
def the_library_waits_for_the_store_lock_as_long_as_casmig_set_lock_wait_says(t):
    lib = lib_of(t)
    s = t.store("lockwait", 2)
    os.makedirs(os.path.join(s, "migration"))
    h = lib.open(s)
    try:
        expect(lib.c.casmig_set_lock_wait(None, 1000) == 2, "a NULL handle is not a usage error")
        lock = os.path.join(s, "migration", "lock")
        # Held throughout: CASMIG_BUSY once the wait is over, and the message says it waited.
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            expect(lib.c.casmig_set_lock_wait(h, 700) == 0, f"set_lock_wait: {lib.error()}")
            t0 = time.time()
            rc, r, _ = lib.migrate(h, ["pkg00"])
            took = time.time() - t0
            expect(rc == 4 and 0.7 <= took < 10 and "waited 700ms" in lib.error(),
                   f"held throughout: {rc} after {took:.2f}s, {lib.error()!r}")
            # Released after 1 s by another thread: the call waits and then migrates.
            expect(lib.c.casmig_set_lock_wait(h, 10000) == 0, f"set_lock_wait: {lib.error()}")
            releaser = threading.Timer(1.0, f.close)
            releaser.start()
            t0 = time.time()
            rc, r, _ = lib.migrate(h, ["pkg00"])
            took = time.time() - t0
            releaser.join()
        expect(rc == 0 and r.verified == 1 and took >= 0.9, f"released after 1s: {rc} after {took:.2f}s, {lib.error()!r}")
        # Back to the default: busy at once.
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            expect(lib.c.casmig_set_lock_wait(h, 0) == 0, "set_lock_wait 0")
            t0 = time.time()
            rc, r, _ = lib.migrate(h, ["pkg01"])
            expect(rc == 4 and time.time() - t0 < 0.5, f"no wait: {rc} after {time.time() - t0:.2f}s")
    finally:
        lib.c.casmig_close(h)


@test
def the_library_never_hands_out_bytes_an_object_name_does_not_vouch_for(t):
    lib = lib_of(t)
    for compress in (False, True):
        s = t.store("capi-corrupt" + ("-z" if compress else ""), 1, extra=lambda root: put(
            os.path.join(root, "pkg00"), "big.txt", b"compressible line of text\n" * 4000))
        t.run(s, "migrate", *(["--compress"] if compress else []), code=0)
        h = lib.open(s)
        try:
            want = open(os.path.join(s, "pkg00", "big.txt"), "rb").read()
            rc, data = lib.read(h, "pkg00", "big.txt")
            expect(rc == 0 and data == want, f"compress={compress}: read {rc} {lib.error()}")
            digest = [e for e in lib.entries(h, "pkg00")[1] if e[0] == "big.txt"][0][4]
            obj = os.path.join(s, "objects", digest[:2], digest[2:]) + (".zst" if compress else "")
            expect(os.path.exists(obj), f"object form: {obj}")
            raw = bytearray(open(obj, "rb").read())
            raw[len(raw) // 2] ^= 1
            os.chmod(obj, 0o644)
            open(obj, "wb").write(bytes(raw))
            rc, data = lib.read(h, "pkg00", "big.txt")
            expect(rc == 1 and data is None and "verify --objects" in lib.error(), f"corrupt object: {rc} {lib.error()!r}")
        finally:
            lib.c.casmig_close(h)


@test
def the_library_reads_no_package_out_of_the_stores_own_directories(t):
    """objects/, migration/, temp/, packages/ and dot-directories are not packages: neither their
    entries nor their files are handed out as if they were (casmig show, list and the library agree)."""
    lib = lib_of(t)
    s = t.store("capi-reserved", 1)
    t.run(s, "migrate", code=0)
    digest = [e for e in lib_entries_of(lib, s, "pkg00") if e[0] == "LICENSE"][0][4]
    os.makedirs(os.path.join(s, ".hidden"))
    put(os.path.join(s, ".hidden"), "f", b"x")
    h = lib.open(s)
    try:
        for pkg, path in [("objects", digest[:2] + "/" + digest[2:]), ("migration", "lock"), (".hidden", "f")]:
            rc, data = lib.read(h, pkg, path)
            expect(rc == 2 and data is None and pkg in lib.error(), f"read {pkg}/{path}: {rc} {lib.error()!r}")
        for pkg in ("objects", "migration", "packages", "temp", ".hidden"):
            rc, es = lib.entries(h, pkg)
            expect(rc == 2 and not es and pkg in lib.error(), f"entries of {pkg}: {rc} {es[:2]} {lib.error()!r}")
    finally:
        lib.c.casmig_close(h)


def lib_entries_of(lib, store, pkg):
    h = lib.open(store)
    try:
        rc, es = lib.entries(h, pkg)
        expect(rc == 0, f"entries of {pkg}: {rc} {lib.error()}")
        return es
    finally:
        lib.c.casmig_close(h)


def make_staging(t, name, extra=None):
    d = os.path.join(t.work, "staging-" + name)
    put(d, "LICENSE", b"shared license\n" * 20)
    put(d, "bin/" + name, os.urandom(5000), 0o755)
    put(d, "share/doc.txt", b"documentation of " + name.encode() + b"\n" * 50)
    os.symlink(name, os.path.join(d, "bin/alias"))
    if extra:
        extra(d)
    return d


@test
def the_library_adds_reads_materializes_and_removes_a_package_without_a_legacy_tree(t):
    lib = lib_of(t)
    s = t.store("capi-add", 2)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    src = make_staging(t, "app")
    h = lib.open(s)
    try:
        rc, r, problems = lib.add(h, "app-1", src)
        expect(rc == 0 and r.files == 3 and r.new_objects == 2 and not problems and lib.error() == "",
               f"add: {rc} files={r.files} new={r.new_objects} {problems} {lib.error()!r}")
        expect(not os.path.lexists(os.path.join(s, "app-1")), "casmig_add made a legacy tree")
        expect(lib.status(h).verified == 3, "the added package is not verified")
        rc, es = lib.entries(h, "app-1")
        files = {e[0]: e for e in es if e[1] == 1}
        expect(rc == 0 and set(files) == {"LICENSE", "bin/app", "share/doc.txt"} and all(e[4] for e in files.values()),
               f"entries: {rc} {es}")
        for rel in files:
            rc, data = lib.read(h, "app-1", rel)
            expect(rc == 0 and data == open(os.path.join(src, rel), "rb").read(), f"read {rel}: {rc} {lib.error()}")
        dest = os.path.join(t.work, "app-1-tree")
        expect(lib.c.casmig_materialize(h, b"app-1", dest.encode(), 0) == 0, f"materialize: {lib.error()}")
        expect(legacy_listing(dest).keys() == legacy_listing(src).keys(), "materialized tree differs")
        expect(lib.c.casmig_materialize(h, b"app-1", dest.encode(), 7) == 2 and "link_mode" in lib.error(),
               f"bad link mode: {lib.error()!r}")
        # Refusals and bad input: codes and one line each, the store unchanged.
        rc, _, _ = lib.add(h, "app-1", src)
        expect(rc == 3 and "already in store" in lib.error(), f"add twice: {rc} {lib.error()!r}")
        rc, _, _ = lib.add(h, "../up", src)
        expect(rc == 2 and "package id" in lib.error(), f"bad id: {rc} {lib.error()!r}")
        bad = make_staging(t, "bad", extra=lambda d: os.mkfifo(os.path.join(d, "share", "fifo")))
        rc, _, problems = lib.add(h, "bad-1", bad)
        expect(rc == 1 and any(p[0] == "bad-1" and "share/fifo" in p[1] for p in problems), f"fifo: {rc} {problems}")
        expect(lib.status(h).packages == 3, "a failed add was recorded")
        with open(os.path.join(s, "migration", "lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            rc, _, _ = lib.add(h, "app-2", src)
            expect(rc == 4 and lib.error(), f"busy: {rc} {lib.error()!r}")
            expect(lib.c.casmig_remove(h, b"app-1") == 4, "remove under a held lock")
        expect(lib.c.casmig_remove(h, b"app-1") == 0 and lib.error() == "", f"remove: {lib.error()}")
        expect(lib.c.casmig_remove(h, b"app-1") == 2 and "app-1" in lib.error(), f"remove twice: {lib.error()!r}")
        rc, _ = lib.entries(h, "app-1")
        expect(rc == 2, "a removed package still has entries")
        t.run(s, "verify", "--objects", code=0)
    finally:
        lib.c.casmig_close(h)


@test
def the_c_example_runs_in_tree_and_against_an_installed_library(t):
    s = t.store("capi-pm", 2)
    pm = os.path.join(build_dir(t), "casmig-pm-example")
    p = subprocess.run([pm, s, "migrate", "pkg00"], capture_output=True, text=True)
    expect(p.returncode == 0 and "verified 1" in p.stdout, f"pm migrate: {p.returncode} {p.stdout} {p.stderr}")
    p = subprocess.run([pm, s, "cat", "pkg00", "bin/tool0"], capture_output=True)
    expect(p.returncode == 0 and p.stdout == open(os.path.join(s, "pkg00", "bin", "tool0"), "rb").read(), "pm cat")
    p = subprocess.run([pm, s, "cat", "pkg00", "../pkg01/LICENSE"], capture_output=True, text=True)
    expect(p.returncode == 2 and "pm: " in p.stderr, f"pm cat outside: {p.returncode} {p.stderr!r}")
    # Installed: headers, library, soname link and casmig.pc land under DESTDIR; the example builds
    # from the .pc file alone and runs against the installed library.
    if not shutil.which("pkg-config") or not shutil.which("cc"):
        raise AssertionError("pkg-config and cc are needed (tools/bootstrap installs them)")
    dest = os.path.join(t.work, "destdir")
    p = subprocess.run(["meson", "install", "-C", build_dir(t), "--destdir", dest, "--no-rebuild", "--quiet"],
                       capture_output=True, text=True)
    expect(p.returncode == 0, f"meson install: {p.stderr[-500:]}")
    pcs = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs if f == "casmig.pc"]
    hdr = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs if f == "casmig.h"]
    libs = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs if f.startswith("libcasmig.so")]
    expect(len(pcs) == 1 and len(hdr) == 1 and len(libs) >= 2, f"installed: {pcs} {hdr} {libs}")
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pcs[0]), PKG_CONFIG_SYSROOT_DIR=dest)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "casmig"], capture_output=True, text=True, env=env)
    expect(flags.returncode == 0, f"pkg-config: {flags.stderr}")
    exe = os.path.join(t.work, "pm-installed")
    cc = subprocess.run(["cc", "-Wall", "-Werror", os.path.join(ROOT, "tools", "examples", "pm.c"), "-o", exe]
                        + flags.stdout.split(), capture_output=True, text=True)
    expect(cc.returncode == 0, f"cc: {cc.stderr[-800:]}")
    libdir = os.path.dirname(libs[0])
    # Under tools/sanitize the installed library is instrumented and this example is not: its runtime
    # goes first (a normal build needs nothing).
    run_env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    if sanitizer_runtimes(libs[0]):
        run_env["LD_PRELOAD"] = sanitizer_runtimes(libs[0])
    p = subprocess.run([exe, s, "migrate", "pkg01"], capture_output=True, text=True, env=run_env)
    expect(p.returncode == 0 and "verified 1" in p.stdout, f"installed pm: {p.returncode} {p.stdout} {p.stderr}")
    ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, env=dict(os.environ, LD_LIBRARY_PATH=libdir)).stdout
    expect(dest in ldd, f"the installed example did not use the installed library: {ldd}")
    p = subprocess.run([exe, s, "status"], capture_output=True, text=True, env=run_env)
    expect(p.returncode == 0 and "2 verified" in p.stdout, f"installed pm status: {p.stdout} {p.stderr}")
    # A package manager's life after cutover, through the installed library: install a package from a
    # staging directory, read it back, upgrade it (new id in, old id out), remove it.
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)

    def pm(*args):
        return subprocess.run([exe, s] + list(args), capture_output=True, env=run_env)
    v1, v2 = make_staging(t, "hello"), make_staging(t, "hello2")
    p = pm("install", "hello-1", v1)
    expect(p.returncode == 0 and b"installed hello-1" in p.stdout, f"pm install: {p.returncode} {p.stderr!r}")
    p = pm("cat", "hello-1", "bin/hello")
    expect(p.returncode == 0 and p.stdout == open(os.path.join(v1, "bin", "hello"), "rb").read(), "pm cat hello-1")
    p = pm("ls", "hello-1")
    expect(p.returncode == 0 and b"bin/alias" in p.stdout, f"pm ls: {p.stdout!r}")
    p = pm("upgrade", "hello-1", "hello-2", v2)
    expect(p.returncode == 0 and b"upgraded hello-1 to hello-2" in p.stdout, f"pm upgrade: {p.returncode} {p.stderr!r}")
    p = pm("cat", "hello-2", "bin/hello2")
    expect(p.returncode == 0 and p.stdout == open(os.path.join(v2, "bin", "hello2"), "rb").read(), "pm cat hello-2")
    p = pm("cat", "hello-1", "bin/hello")
    expect(p.returncode == 2, f"hello-1 is still readable after the upgrade: {p.returncode}")
    mat = os.path.join(t.work, "pm-mat")
    p = pm("materialize", "hello-2", mat)
    expect(p.returncode == 0 and open(os.path.join(mat, "bin", "hello2"), "rb").read() ==
           open(os.path.join(v2, "bin", "hello2"), "rb").read(), f"pm materialize: {p.stderr!r}")
    p = pm("remove", "hello-2")
    expect(p.returncode == 0, f"pm remove: {p.stderr!r}")
    expect(t.json(s, "status")["packages"]["total"] == 2, "the package manager's packages are not gone")


def sanitizer_runtimes(lib):
    """The ASan/UBSan runtimes a sanitized build's library needs loaded first ("" for a normal build)."""
    out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    return ":".join(line.split("=>")[1].split()[0] for line in out.splitlines()
                    if "=>" in line and ("libasan" in line or "libubsan" in line))


def reexec_under_sanitizer():
    # tools/sanitize builds libcasmig with AddressSanitizer: Python itself is not instrumented, so the
    # runtime must be preloaded, and the interpreter's own leaks are not the library's (the in-tree C
    # example, an instrumented executable, still runs with leak detection in its own process).
    casmig = sys.argv[sys.argv.index("--casmig") + 1]
    pre = sanitizer_runtimes(os.path.join(os.path.dirname(os.path.abspath(casmig)), "libcasmig.so.0"))
    if os.environ.get("CASMIG_CAPI_PRELOADED"):
        # This interpreter has the runtime; the processes it starts (casmig, the C example, meson, cc)
        # must not inherit the preload, and keep the sanitizer options they were given.
        os.environ.pop("LD_PRELOAD", None)
        os.environ["ASAN_OPTIONS"] = os.environ.pop("CASMIG_CAPI_ASAN_OPTIONS", "")
        return
    if not pre:
        return
    env = dict(os.environ, LD_PRELOAD=pre, CASMIG_CAPI_PRELOADED="1",
               CASMIG_CAPI_ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", ""),
               ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


if __name__ == "__main__":
    reexec_under_sanitizer()
    sys.exit(harness.main("capi"))
