#!/usr/bin/env python3
"""Sparse files: a file with holes (or long written zero runs) costs about its allocated size in objects/,
comes back with its holes from materialize and rollback, and cleanup reports the space it really frees.

Files here are compared extent by extent (SEEK_DATA/SEEK_HOLE), never read whole: reading 4 GiB of
holes would cost the test more than casmig's whole run."""
import os
import random
import stat
import subprocess
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, expect  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
# Data of the 4 GiB image: unaligned and aligned offsets, a hole at the start, one at the end.
IMAGE_SIZE = 4 * GiB
IMAGE_DATA = [(MiB + 12345, MiB), (GiB, 2 * MiB), (2 * GiB + 3 * 4096, MiB + 7), (3 * GiB + GiB // 2, MiB)]
SLACK = 2 * MiB  # allocation noise: filesystem blocks at extent edges, one block for a trailing hole


def chunk(seed, size):
    return random.Random(seed).randbytes(size)


def write_sparse(path, size, pieces, mode=0o644):
    """A file of `size` bytes holding each (offset, length) piece of seeded random data, holes elsewhere."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.ftruncate(fd, size)
        for i, (off, n) in enumerate(pieces):
            os.pwrite(fd, chunk(i, n), off)
    finally:
        os.close(fd)


def allocated(path):
    return os.lstat(path).st_blocks * 512


def du(root):
    total = 0
    for dirpath, _, files in os.walk(root):
        for n in files:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total


def extents(fd, size):
    out, off = [], 0
    while off < size:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: a hole to the end
            break
        e = min(os.lseek(fd, d, os.SEEK_HOLE), size)
        out.append((d, e))
        off = e
    return out


def same_content(a, b):
    """True if files a and b have the same size and bytes; only their data extents are read."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    size = os.path.getsize(a)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        ranges = sorted(extents(fa, size) + extents(fb, size))
        for start, end in ranges:  # outside every range both files read as zeros
            off = start
            while off < end:
                n = min(8 * MiB, end - off)
                if os.pread(fa, n, off) != os.pread(fb, n, off):
                    return False
                off += n
        return True
    finally:
        os.close(fa)
        os.close(fb)


def holes_supported(work):
    probe = os.path.join(work, "hole-probe")
    write_sparse(probe, 64 * MiB, [(0, 4096)])
    ok = allocated(probe) < 8 * MiB
    os.unlink(probe)
    return ok


def near(got, want, what):
    expect(abs(got - want) <= SLACK, f"{what}: {got} bytes allocated, expected about {want}")


@test
def sparse_image_migrates_materializes_cleans_up_and_rolls_back_sparse(t):
    if not holes_supported(t.work):
        print("SKIP: the test directory's filesystem does not keep holes")
        return
    s = t.store("sparse", 1)
    img = os.path.join(s, "pkg00", "images", "disk.img")
    write_sparse(img, IMAGE_SIZE, IMAGE_DATA)
    os.utime(img, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    pristine = os.path.join(t.work, "pristine.img")
    write_sparse(pristine, IMAGE_SIZE, IMAGE_DATA)
    src_alloc = allocated(img)
    expect(src_alloc < 16 * MiB, f"the source image is not sparse ({src_alloc} bytes allocated)")
    others = du(os.path.join(s, "pkg00")) - src_alloc  # the small files beside it

    m = t.json(s, "migrate")
    expect(m["verified"] == 1 and m["failed"] == 0, f"migrate: {m}")
    objects = os.path.join(s, "objects")
    near(du(objects), src_alloc + others, "objects/ after migrate")
    st = t.json(s, "status")
    expect(st["logical_bytes"] >= IMAGE_SIZE and st["stored_bytes"] < 32 * MiB,
           f"status counts the image's apparent size as stored: {st['stored_bytes']}")
    expect(os.listdir(os.path.join(s, "temp")) == [], "temp/ is not empty after migrate")

    dest = os.path.join(t.work, "materialized")
    t.run(s, "materialize", "pkg00", dest, code=0)
    out = os.path.join(dest, "images", "disk.img")
    expect(same_content(out, pristine), "materialize: the image's content differs")
    near(allocated(out), src_alloc, "materialized image")
    expect(os.lstat(out).st_mtime_ns == 1_600_000_000_123_456_789, "materialize: mtime differs")

    t.run(s, "cutover", code=0)
    dry = t.json(s, "cleanup", "--dry-run")
    expect(dry["freed_bytes"] >= IMAGE_SIZE, f"cleanup --dry-run: {dry}")
    near(dry["freed_allocated_bytes"], src_alloc + others, "cleanup --dry-run's freed_allocated_bytes")
    c = t.json(s, "cleanup")
    expect(c["trees"] == 1 and c["skipped"] == 0, f"cleanup: {c}")
    expect(c["freed_bytes"] >= IMAGE_SIZE, f"freed_bytes (apparent sizes) lost its meaning: {c}")
    near(c["freed_allocated_bytes"], src_alloc + others, "cleanup's freed_allocated_bytes")
    expect(not os.path.exists(os.path.join(s, "pkg00")), "cleanup left the tree")

    r = t.json(s, "rollback")
    expect(r["failed"] == 0 and r["rebuilt"] == 1, f"rollback: {r}")
    expect(same_content(img, pristine), "rollback: the image's content differs")
    near(allocated(img), src_alloc, "rolled-back image")
    st = os.lstat(img)
    expect(st.st_size == IMAGE_SIZE and st.st_mtime_ns == 1_600_000_000_123_456_789 and stat.S_IMODE(st.st_mode) == 0o644,
           f"rollback: size, mtime or mode differ: {st}")
    t.run(s, "verify", code=0)
    near(du(objects), src_alloc + others, "objects/ after rollback")


@test
def written_zero_runs_become_holes_in_objects_and_copies(t):
    """Zeros written out (not holes) in long aligned runs are stored as holes; short or unaligned ones stay."""
    if not holes_supported(t.work):
        print("SKIP: the test directory's filesystem does not keep holes")
        return
    s = t.store("zeros", 1)
    pkg = os.path.join(s, "pkg00")
    # Streamed path (over 8 MiB): 1 MiB data, 24 MiB of written zeros, 1 MiB data, 8 MiB zeros to the end.
    big = chunk(1, MiB) + bytes(24 * MiB) + chunk(2, MiB) + bytes(8 * MiB)
    put(pkg, "big.bin", big)
    # Whole-file path (under 8 MiB): 3 MiB of zeros between data, plus a zero run too short to matter.
    small = chunk(3, 100_000) + bytes(3 * MiB) + chunk(4, 5000) + bytes(60_000) + chunk(5, 10)
    put(pkg, "small.bin", small)
    expect(allocated(os.path.join(pkg, "big.bin")) >= len(big), "the source was expected dense")
    t.run(s, "migrate", code=0)
    objects = os.path.join(s, "objects")
    expect(du(objects) < 4 * MiB + 512 * 1024 + 200_000,
           f"objects/ holds {du(objects)} bytes: the zero runs were written out")
    dest = os.path.join(t.work, "out")
    t.run(s, "materialize", "pkg00", dest, code=0)
    for name, data in (("big.bin", big), ("small.bin", small)):
        with open(os.path.join(dest, name), "rb") as f:
            expect(f.read() == data, f"materialize: {name} differs")
    expect(allocated(os.path.join(dest, "big.bin")) < 3 * MiB, "materialize wrote the object's holes out")
    t.run(s, "verify", "--objects", code=0)


@test
def cleanup_counts_the_blocks_of_a_hard_linked_file_once(t):
    """Two names of one 4 MiB file in a package: freed_bytes counts both names, freed_allocated_bytes the
    blocks once (the filesystem gets them back once)."""
    s = t.store("hardlinked", 1)
    pkg = os.path.join(s, "pkg00")
    others = du(pkg)  # the small files t.store() puts in every package
    put(pkg, "a.bin", chunk(9, 4 * MiB))
    os.link(os.path.join(pkg, "a.bin"), os.path.join(pkg, "b.bin"))
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    for args in (["--dry-run"], []):
        c = t.json(s, "cleanup", *args)
        expect(c["freed_bytes"] >= 8 * MiB, f"cleanup {args}: freed_bytes counts each name: {c}")
        expect(4 * MiB <= c["freed_allocated_bytes"] <= 4 * MiB + others, f"cleanup {args}: blocks counted twice: {c}")


@test
def rollback_on_a_disk_smaller_than_the_image_counts_allocated_bytes(t):
    """A 1 GiB image holding 3 MiB of data, in a store on a 64 MiB filesystem: migrate, cleanup and
    rollback all fit, and rollback's space check does not ask for the apparent 1 GiB."""
    mnt = os.path.join(t.work, "small")
    os.makedirs(mnt)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=65536k", "tmpfs", mnt], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"SKIP: cannot mount a small tmpfs here ({p.stderr.strip() or 'mount failed'})")
        return
    try:
        s = os.path.join(mnt, "store")
        pieces = [(0, MiB), (GiB // 2, MiB), (GiB - MiB, MiB)]
        write_sparse(os.path.join(s, "pkg00", "disk.img"), GiB, pieces)
        pristine = os.path.join(t.work, "small-pristine.img")
        write_sparse(pristine, GiB, pieces)
        t.run(s, "migrate", code=0)
        t.run(s, "cutover", code=0)
        t.run(s, "cleanup", code=0)
        rc, out, err = t.run(s, "rollback")
        expect(rc == 0, f"rollback exited {rc}: {err.strip()}")
        img = os.path.join(s, "pkg00", "disk.img")
        expect(same_content(img, pristine) and allocated(img) < 8 * MiB, "rollback: the image differs or is not sparse")
    finally:
        subprocess.run(["umount", "-l", mnt])


if __name__ == "__main__":
    sys.exit(harness.main("e2e-sparse"))
