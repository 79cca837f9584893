#!/usr/bin/env python3
"""The fault matrix: each command, with one durable system call failing (ENOSPC, EIO, EACCES) through
the I/O seam (CASMIG_FAULT=OP@N=ERR), must stop cleanly and record nothing that is not durable.

For each command (run from the store state where it makes sense) the calls of each op (write, fsync,
syncfs, rename, link, unlink, mkdir, open, copy) are counted once with CASMIG_FAULT_TRACE; then the 1st
and a later call (the middle one, or the last) fail with each errno. Each fault must give:
  * exit 1 (or 3, refused), or 0 only when the store is exactly as a success leaves it;
  * stderr: lines naming what and where, no stack trace, no "terminate called";
  * a plain rerun of the same command (when the faulted run did not finish) exits 0, and afterwards
    the invariants of tests/e2e/matrix.py hold: objects hash to their names, every package is an exact
    legacy tree or materializes exactly, temp/ is empty.
Sticky faults (OP@N+=ENOSPC: that call and every later one fail, the disk stays full) are run too.

Usage: test_faults.py --casmig PATH [--full] [--jobs N] [--case 'LABEL|SPEC'] [--only TEST]
  default  CI: N=1 and the later N of every op, errnos rotated over the ops, sticky ENOSPC at N=1
  --full   every op x both N x every errno, sticky at both N (tools/crash-campaign)
"""
import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, expect  # noqa: E402
import matrix  # noqa: E402

COMMANDS = [
    ("migrate", "legacy", ["migrate"]),
    ("verify", "migrated", ["verify", "--objects"]),
    ("cutover", "migrated", ["cutover"]),
    ("cleanup", "cutover", ["cleanup"]),
    ("rollback", "cleaned", ["rollback"]),
    ("materialize", "cleaned", ["materialize", "pkg00", "{dest}"]),
    ("add", "cleaned", ["add", matrix.ADDED, "{staging}"]),
    ("remove", "cleaned", ["remove", "pkg01"]),
    ("gc", "removed", ["gc"]),
    ("convert", "cleaned", ["convert", "--compress"]),
    ("convert-raw", "converted", ["convert", "--raw"]),
]
OPS = ["write", "fsync", "syncfs", "rename", "link", "unlink", "mkdir", "open", "copy"]
ERRNOS = ["ENOSPC", "EIO", "EACCES"]
STICKY_OPS = {"write", "copy", "open", "mkdir", "fsync"}

# Failures found by this matrix and not fixed yet: (label, CASMIG_FAULT prefix) -> what is wrong. Such a
# case is reported as KNOWN and does not fail the run; once it passes, the run fails until the entry is
# removed (so this list never hides a fixed bug or a new one).
KNOWN = {}

OPTS = argparse.Namespace(full=False, jobs=2, case=None)
_pristine = None


def pristine(t):
    global _pristine
    if _pristine is None:
        _pristine = matrix.Pristine(t.casmig, os.path.join(t.work, "states"))
    return _pristine


def count_calls(t, label, state, args):
    p = pristine(t)
    d = tempfile.mkdtemp(prefix=f"count-{label}-", dir=t.work)
    store = os.path.join(d, "store")
    matrix.copy_tree(p.states[state], store)
    trace = os.path.join(d, "trace")
    a = [x.replace("{dest}", os.path.join(d, "dest")).replace("{staging}", p.staging) for x in args]
    code, _, err = matrix.run(t.casmig, store, a, env={"CASMIG_FAULT_TRACE": trace})
    expect(code == 0, f"{label}: exited {code}: {err.strip()[-300:]}")
    expect(os.path.exists(trace), "no CASMIG_FAULT_TRACE written: is this a build with -Dtest_seams=true?")
    counts = Counter()
    for line in open(trace):
        op, n = line.split()
        counts[op] += int(n)
    matrix.remove_tree(d)
    return {op: counts[op] for op in OPS if counts[op]}


def specs(counts):
    """The CASMIG_FAULT values of this run's selection."""
    out = []
    k = 0
    for op, count in counts.items():
        later = count if count <= 2 else (count + 1) // 2
        nth = sorted({1, later})
        for n in nth:
            errs = ERRNOS if OPTS.full else [ERRNOS[k % len(ERRNOS)]]
            k += 1
            out += [f"{op}@{n}={e}" for e in errs]
            if op in STICKY_OPS and (OPTS.full or n == 1):
                out.append(f"{op}@{n}+=ENOSPC")
    return out


def run_case(t, label, state, args, spec, keep=False):
    """Returns (faulted exit code, rerun exit code or None, [problems])."""
    p = pristine(t)
    d = tempfile.mkdtemp(prefix=f"fault-{label}-", dir=t.work)
    store = os.path.join(d, "store")
    matrix.copy_tree(p.states[state], store)
    dest = os.path.join(d, "dest")
    a = [x.replace("{dest}", dest).replace("{staging}", p.staging) for x in args]
    code, _, err = matrix.run(t.casmig, store, a, env={"CASMIG_FAULT": spec})
    problems = [f"faulted run: {x}" for x in matrix.stderr_problems(code, err)]
    must, may = p.expected(state, args)
    rerun = None
    if code == 0:
        # The fault was absorbed: the store must be as a success leaves it. A failed unlink of a temp
        # file cannot be helped: the next locked command must empty temp/ then.
        absorbed_unlink = spec.startswith("unlink@")
        problems += matrix.check_store(t.casmig, store, p, must, may, d, after=None if absorbed_unlink else a[0],
                                       after_code=0)
        if absorbed_unlink:
            vcode, _, verr = matrix.run(t.casmig, store, ["verify"])
            temp = os.path.join(store, "temp")
            if vcode in (0, 1) and os.path.isdir(temp) and os.listdir(temp):
                problems.append(f"temp/ still holds {sorted(os.listdir(temp))[:4]} after a later verify")
        if a[0] == "materialize":
            dd = matrix.diff(p.snaps[a[1]], matrix.snap(dest))
            if dd:
                problems.append(f"materialize exited 0 under the fault with a wrong tree: {dd}")
    else:
        if code not in (1, 3):
            problems.append(f"faulted run exited {code}, expected 1 or 3")
        matrix.remove_tree(dest)
        rerun, _, rerr = matrix.run(t.casmig, store, a)
        if rerun != 0:
            lines = rerr.strip().splitlines() or [""]
            problems.append(f"the rerun without a fault exited {rerun}: {lines[0][:300]}"
                            + (f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""))
        problems += matrix.check_store(t.casmig, store, p, must, may, d, after=a[0], after_code=rerun)
        if a[0] == "materialize" and rerun == 0:
            dd = matrix.diff(p.snaps[a[1]], matrix.snap(dest))
            if dd:
                problems.append(f"materialize rerun exited 0 with a wrong tree: {dd}")
    if problems and err.strip():
        problems.append(f"(stderr of the faulted run: {err.strip().splitlines()[-1][:200]})")
    if keep:
        print(f"case kept in {d}")
    else:
        matrix.remove_tree(d)
    return code, rerun, problems


def repro(label, state, args, spec):
    return (f"REPRO: state={state} command='casmig {' '.join(args)}' CASMIG_FAULT={spec} then a plain rerun | "
            f"replay: python3 tests/e2e/test_faults.py --casmig build/casmig --case '{label}|{spec}'")


def matrix_for(t, label):
    state, args = next((s, a) for l, s, a in COMMANDS if l == label)
    counts = count_calls(t, label, state, args)
    if not counts:
        print(f"  {label}: no call goes through the seam (nothing to fail)")
        return
    cases = specs(counts)
    t0 = time.time()
    failures, tally, known, fixed = [], Counter(), [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=OPTS.jobs) as ex:
        futs = {ex.submit(run_case, t, label, state, args, s): s for s in cases}
        for fut in concurrent.futures.as_completed(futs):
            s = futs[fut]
            code, rerun, problems = fut.result()
            tally[f"{code}" + ("" if rerun is None else f"/rerun {rerun}")] += 1
            why = next((w for (l, pre), w in KNOWN.items() if l == label and s.startswith(pre)), None)
            if problems and why:
                known.append(f"KNOWN {label} CASMIG_FAULT={s}: {why}")
            elif problems:
                failures.append(f"{repro(label, state, args, s)}\n    " + "\n    ".join(problems))
            elif why:
                fixed.append(f"{label} CASMIG_FAULT={s} passes now: remove its KNOWN entry ({why[:60]}…)")
    calls = ", ".join(f"{k}x{v}" for k, v in counts.items())
    print(f"  {label} (from {state}): calls {calls}; {len(cases)} faults in {time.time() - t0:.0f}s; "
          f"exit codes {dict(sorted(tally.items()))}", flush=True)
    for f in sorted(known) + sorted(failures) + fixed:
        print(f, flush=True)
    expect(not failures and not fixed, f"{label}: {len(failures)} failing fault cases (REPRO lines above), "
                                       f"{len(fixed)} KNOWN entries to remove")


def make(label):
    def fn(t):
        matrix_for(t, label)
    fn.__name__ = "faults_" + label
    return fn


for _label, _s, _a in COMMANDS:
    test(make(_label))


@test
def migrate_fault_is_seen(t):
    """The seam reaches migrate's durable calls: each op publish uses is counted (else the matrix is empty)."""
    counts = count_calls(t, "migrate", "legacy", ["migrate"])
    for op in ("write", "syncfs", "rename", "open", "mkdir"):
        expect(counts.get(op, 0) > 0, f"migrate makes no {op} call through the seam: {counts}")
    p = pristine(t)
    d = os.path.join(t.work, "seen")
    matrix.copy_tree(p.states["legacy"], d)
    code, _, err = matrix.run(t.casmig, d, ["migrate"], env={"CASMIG_FAULT": "syncfs@1=EIO"})
    expect(code == 1 and "syncfs" in err and "/" in err, f"syncfs EIO: exit {code}, {err!r}")
    # A failing object write inside the pipeline's parallel stage: the run stops with one line, and the
    # units in flight are released (under the sanitizer build, a leak would abort the process).
    for n in (1, 5, 12):
        d = os.path.join(t.work, f"seen-write-{n}")
        matrix.copy_tree(p.states["legacy"], d)
        code, _, err = matrix.run(t.casmig, d, ["-j", "2", "migrate"], env={"CASMIG_FAULT": f"write@{n}=EIO"})
        expect(code == 1 and "write failed" in err and len(err.strip().splitlines()) == 1,
               f"write@{n} EIO in the pipeline: exit {code}, {err!r}")


@test
def damaged_objects_are_reported(t):
    """Disk damage to an object after cleanup (its only copy): a shorter object and a same-size flipped
    byte are each reported by verify (size) or verify --objects (content), naming the object, exit 1;
    materialize never hands out the wrong bytes with exit 0."""
    p = pristine(t)
    for damage in ("truncate", "flip"):
        d = os.path.join(t.work, f"damaged-{damage}")
        matrix.copy_tree(p.states["cleaned"], d)
        objs = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "objects")) for f in fs)
        victim = max(objs, key=os.path.getsize)  # data/big.bin of pkg00 and pkg01
        os.chmod(victim, 0o644)
        with open(victim, "r+b") as f:
            if damage == "truncate":
                f.truncate(os.path.getsize(victim) - 1)
            else:
                f.seek(100)
                b = f.read(1)
                f.seek(100)
                f.write(bytes([b[0] ^ 1]))
        os.chmod(victim, 0o444)
        name = os.path.relpath(victim, d)
        args = ["verify"] if damage == "truncate" else ["verify", "--objects"]
        code, _, err = matrix.run(t.casmig, d, args)
        expect(code == 1 and os.path.basename(victim) in err,
               f"{damage}: casmig {' '.join(args)} exited {code} without naming {name}: {err.strip()[-300:]!r}")
        expect(not matrix.stderr_problems(code, err), f"{damage}: {matrix.stderr_problems(code, err)}")
        for pkg in ("pkg00", "pkg01"):
            dest = os.path.join(t.work, f"damaged-{damage}-{pkg}")
            mcode, merr = matrix.materialize(t.casmig, d, pkg, dest)
            if mcode == 0:
                dd = matrix.diff(p.snaps[pkg], matrix.snap(dest))
                expect(dd is None, f"{damage}: materialize {pkg} exited 0 with a wrong tree: {dd}")


@test
def legacy_mode_damage_is_reported(t):
    """A legacy file's mode changed after migrate (a chmod by hand): verify reports it, naming the
    package, the path and 'mode', exit 1 (rollback restores modes, so verify must hold trees to them)."""
    p = pristine(t)
    d = os.path.join(t.work, "mode-damage")
    matrix.copy_tree(p.states["migrated"], d)
    os.chmod(os.path.join(d, "pkg02", "bin", "tool2"), 0o700)
    code, _, err = matrix.run(t.casmig, d, ["verify", "pkg02"])
    expect(code == 1 and "pkg02" in err and "bin/tool2" in err and "mode" in err,
           f"verify after a chmod: exit {code}, {err.strip()[-300:]!r}")


def replay(t):
    label, spec = OPTS.case.split("|")
    state, args = next((s, a) for l, s, a in COMMANDS if l == label)
    code, rerun, problems = run_case(t, label, state, args, spec, keep=True)
    print(f"faulted run: exit {code}; rerun: {rerun}")
    for x in problems:
        print(f"  {x}")
    expect(not problems, "the case fails")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--case")
    OPTS, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    matrix.skip_without_seams(sys.argv)
    if OPTS.case:
        harness.TESTS[:] = [replay]
        sys.argv.append("--keep")
    print(f"fault matrix: {'full' if OPTS.full else 'CI sample'}, {OPTS.jobs} jobs", flush=True)
    sys.exit(harness.main("e2e-faults"))
