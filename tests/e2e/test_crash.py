#!/usr/bin/env python3
"""The cross-command crash matrix: crash every command at each of its named durable steps (kill -9 or a
simulated power cut), run each follow-up command a user could run next, check that nothing is lost.

For each command C (migrate, verify, cutover, cleanup, rollback, materialize, remove, gc, convert), run from the
store state where it makes sense, the crash points are discovered by running C once with
CASMIG_CRASH_TRACE (so points added later are covered without touching this file). For each point P
reached N times: the case P@N, for N = every hit when there are few, else first, middle and last; in
each mode kill, power-data, power-names. The crashed store is copied once per follow-up F (the same C,
rollback, migrate, verify, cleanup, gc); after F the invariants of tests/e2e/matrix.py must hold.

Usage: test_crash.py --casmig PATH [--full] [--jobs N] [--seed S] [--case 'LABEL|P@N|MODE|F'] [--only TEST]
  default  the CI sample: every point at N=1 in every mode: kill followed by the same command and by
           rollback, power-data checked right after the cut, power-names right after the cut and after
           the same command and gc (a command that recovers nothing: records must match the disk); plus a rotating
           subset of the rest (seeded by the date unless --seed or CASMIG_CRASH_SEED; the seed is printed)
  --full   every point x every N x every mode x every follow-up, and the invariants right after the
           crash before any command ("none") (tools/crash-campaign)
  --case   replay one case and keep its directories
A failing case prints one REPRO line holding everything needed to replay it.
"""
import argparse
import concurrent.futures
import datetime
import hashlib
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, expect  # noqa: E402
import matrix  # noqa: E402

# (label, starting state, arguments). "{dest}" is a fresh directory outside the store, "{staging}" the
# package manager's staging directory of matrix.ADDED (read, never written).
COMMANDS = [
    ("migrate", "legacy", ["migrate"]),
    ("migrate-named", "legacy", ["migrate"]),
    ("verify", "migrated", ["verify", "--objects"]),
    ("cutover", "migrated", ["cutover"]),
    ("cleanup", "cutover", ["cleanup"]),
    ("rollback", "cleaned", ["rollback"]),
    ("rollback-uncleaned", "cutover", ["rollback"]),
    ("materialize", "cleaned", ["materialize", "pkg00", "{dest}"]),
    ("add", "cleaned", ["add", matrix.ADDED, "{staging}"]),
    ("add-dual", "migrated", ["add", matrix.ADDED, "{staging}"]),
    ("remove", "cleaned", ["remove", "pkg01"]),
    ("remove-present", "migrated", ["remove", "pkg01"]),
    ("gc", "removed", ["gc"]),
    ("rebuild-catalog", "lost", ["rebuild-catalog"]),
    ("convert", "cleaned", ["convert", "--compress"]),
    ("convert-raw", "converted", ["convert", "--raw"]),
]
# Extra environment of the crashed run (and of its discovery run), by label. "migrate-named": at most two
# staged objects are unnamed (O_TMPFILE, linked into objects/), the rest named and renamed: both ways
# of publishing in one batch (CASMIG_ANON_BUDGET is a test seam; the default is unnamed only).
COMMAND_ENV = {"migrate-named": {"CASMIG_ANON_BUDGET": "2"}}
MODES = ["kill", "power-data", "power-names"]
FOLLOWUPS = ["same", "rollback", "migrate", "verify", "cleanup", "gc"]
ROTATING = 8  # extra (case, follow-up) pairs per command in the CI sample

OPTS = argparse.Namespace(full=False, jobs=2, seed=None, case=None)
_pristine = None


def pristine(t):
    global _pristine
    if _pristine is None:
        _pristine = matrix.Pristine(t.casmig, os.path.join(t.work, "states"))
    return _pristine


def ns(count):
    if count <= 4:
        return list(range(1, count + 1))
    return sorted({1, (count + 1) // 2, count})


def discover(t, label, state, args):
    """{point: hits} for one run of the command (on a throw-away copy)."""
    p = pristine(t)
    d = tempfile.mkdtemp(prefix=f"discover-{label}-", dir=t.work)
    store = os.path.join(d, "store")
    matrix.copy_tree(p.states[state], store)
    trace = os.path.join(d, "trace")
    a = fill(t, args, os.path.join(d, "dest"))
    code, _, err = matrix.run(t.casmig, store, a, env=dict(COMMAND_ENV.get(label, {}), CASMIG_CRASH_TRACE=trace))
    expect(code == 0, f"{label}: casmig {' '.join(args)} from state {state} exited {code}: {err.strip()[-300:]}")
    hits = Counter(open(trace).read().split()) if os.path.exists(trace) else Counter()
    matrix.remove_tree(d)
    return dict(sorted(hits.items()))


def fill(t, args, dest):
    return [x.replace("{dest}", dest).replace("{staging}", pristine(t).staging) for x in args]


def followup_args(t, f, args, dest):
    if f == "same":
        return fill(t, args, dest)
    return [f]


def repro(label, state, args, point, n, mode, f):
    return (f"REPRO: state={state} command='casmig {' '.join(args)}' CASMIG_CRASH_AT={point}@{n} "
            f"CASMIG_CRASH_MODE={mode} follow-up='{f}' | replay: python3 tests/e2e/test_crash.py --casmig build/casmig "
            f"--case '{label}|{point}@{n}|{mode}|{f}'")


def run_case(t, label, state, args, point, n, mode, followups, keep=False):
    """Crash once, then each follow-up on its own copy. Returns (outcome, [(f, code, problems)])."""
    p = pristine(t)
    d = tempfile.mkdtemp(prefix=f"case-{label}-", dir=t.work)
    store = os.path.join(d, "store")
    matrix.copy_tree(p.states[state], store)
    dest = os.path.join(d, "dest")
    a = fill(t, args, dest)
    env = {**COMMAND_ENV.get(label, {}), "CASMIG_CRASH_AT": f"{point}@{n}", "CASMIG_CRASH_MODE": mode,
           "CASMIG_CRASH_ROOT": store + (":" + dest if "{dest}" in " ".join(args) else "")}
    code, _, err = matrix.run(t.casmig, store, a, env=env)
    results = []
    if code != -9:
        if not keep:
            matrix.remove_tree(d)
        # A point hit fewer times in this run than in the discovery run (threads) is not a failure.
        return ("not-reached" if code == 0 else f"exit {code}: {err.strip()[:200]}"), results
    must, may = p.expected(state, args)
    for f in followups:
        fd = os.path.join(d, f"after-{f}")
        os.makedirs(fd)
        fs = os.path.join(fd, "store")
        try:
            matrix.copy_tree(store, fs)
        except Exception as e:  # noqa: BLE001 — reported as this case's failure, the others go on
            results.append((f, None, [f"harness: cannot copy the crashed store: {e}"]))
            continue
        fdest = os.path.join(fd, "dest")
        fa = followup_args(t, f, args, fdest)
        if f == "none":  # the crashed store as it is: nothing lost even before any command runs
            fcode, ferr, problems, fa = "-", "", [], ["none"]
        else:
            fcode, _, ferr = matrix.run(t.casmig, fs, fa)
            problems = matrix.stderr_problems(fcode, ferr)
        if f == "same" and fa[0] == "remove" and fcode == 2 and "is not in store" in ferr:
            problems = [x for x in problems if not x.startswith("exit 2")]  # removed before the crash: a usage error
        cmd = fa[0]
        problems += matrix.check_store(t.casmig, fs, p, must, may, fd, after=cmd, after_code=fcode)
        if cmd == "materialize" and fcode == 0:
            dd = matrix.diff(p.snaps[fa[1]], matrix.snap(fdest))
            if dd:
                problems.append(f"materialize {fa[1]} after the crash exited 0 with a wrong tree: {dd}")
        if problems and ferr.strip():
            problems.append(f"(stderr of {f}: {ferr.strip().splitlines()[-1][:200]})")
        results.append((f, fcode, problems))
        if not keep:
            matrix.remove_tree(fd)
    if keep:
        print(f"case kept in {d}")
    else:
        matrix.remove_tree(d)
    return "crashed", results


def plan(label, hits):
    """[(point, n, mode, [follow-ups])] for this run's selection (CI sample or --full)."""
    cases = []
    for point, count in hits.items():
        for n in ns(count):
            for mode in MODES:
                cases.append((point, n, mode))
    if OPTS.full:
        return [(pt, n, m, ["none"] + FOLLOWUPS) for pt, n, m in cases]
    seed = OPTS.seed
    chosen = {}
    for pt, n, m in cases:
        base = []
        if n == 1:
            base = {"kill": ["same", "rollback"], "power-data": ["none"], "power-names": ["none", "same", "gc"]}[m]
        chosen[(pt, n, m)] = base
    rest = sorted(((pt, n, m, f) for pt, n, m in cases for f in FOLLOWUPS if f not in chosen[(pt, n, m)]),
                  key=lambda k: hashlib.sha256(f"{seed}|{label}|{k}".encode()).hexdigest())
    for pt, n, m, f in rest[:ROTATING]:
        chosen[(pt, n, m)].append(f)
    return [(pt, n, m, fs) for (pt, n, m), fs in chosen.items() if fs]


def matrix_for(t, label):
    state, args = next((s, a) for l, s, a in COMMANDS if l == label)
    hits = discover(t, label, state, args)
    if not hits:
        print(f"  {label}: no crash points reached from state {state} (nothing to crash yet)")
        return
    cases = plan(label, hits)
    t0 = time.time()
    failures, tally, outcomes = [], Counter(), Counter()
    runs = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=OPTS.jobs) as ex:
        futs = {ex.submit(run_case, t, label, state, args, pt, n, m, fs): (pt, n, m) for pt, n, m, fs in cases}
        for fut in concurrent.futures.as_completed(futs):
            pt, n, m = futs[fut]
            outcome, results = fut.result()
            outcomes[outcome if outcome in ("crashed", "not-reached") else "crash run failed"] += 1
            if outcome not in ("crashed", "not-reached"):
                failures.append(f"{label} {pt}@{n} {m}: the crash run did not die by SIGKILL: {outcome}")
            for f, code, problems in results:
                runs += 1
                tally[f"{f}={code}"] += 1
                if problems:
                    failures.append(f"{repro(label, state, args, pt, n, m, f)}\n    " + "\n    ".join(problems))
    pts = ", ".join(f"{k}x{v}" for k, v in hits.items())
    print(f"  {label} (from {state}): points {pts}; {len(cases)} crashes ({dict(outcomes)}), {runs} follow-ups "
          f"in {time.time() - t0:.0f}s; exit codes {dict(sorted(tally.items()))}", flush=True)
    for f in failures:
        print(f, flush=True)
    expect(not failures, f"{label}: {len(failures)} failing crash cases (REPRO lines above)")


@test
def states_are_exact_without_a_crash(t):
    """The harness itself: every state's packages check out (else every case would fail for nothing)."""
    p = pristine(t)
    for state, store in p.states.items():
        must, may = p.expected(state, [])
        problems = matrix.check_store(t.casmig, store, p, must, may, os.path.join(t.work, "baseline"))
        expect(not problems, f"state {state}: {problems}")
    # The checks can fail: a corrupted object and a changed file are both seen.
    d = os.path.join(t.work, "self-check")
    matrix.copy_tree(p.states["cleaned"], d)
    objs = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "objects")) for f in fs)
    victim = max(objs, key=os.path.getsize)
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.write(b"X")
    problems = matrix.check_store(t.casmig, d, p, list(matrix.PACKAGES), [], os.path.join(t.work, "baseline"))
    expect(any("hashes to" in x for x in problems) and any("materialize exited 0 with a wrong tree" in x
                                                             or "LOST" in x for x in problems),
           f"a corrupted object went unnoticed: {problems}")


@test
def crash_migrate(t):
    hits = discover(t, "migrate", "legacy", ["migrate"])
    expect(any(k.startswith("publish.") for k in hits) and "migrate.committed" in hits, f"migrate's points: {hits}")
    matrix_for(t, "migrate")


@test
def crash_migrate_named(t):
    matrix_for(t, "migrate-named")


@test
def crash_verify(t):
    matrix_for(t, "verify")


@test
def crash_cutover(t):
    matrix_for(t, "cutover")


@test
def crash_cleanup(t):
    matrix_for(t, "cleanup")


@test
def crash_rollback(t):
    matrix_for(t, "rollback")


@test
def crash_rollback_uncleaned(t):
    matrix_for(t, "rollback-uncleaned")


@test
def crash_materialize(t):
    matrix_for(t, "materialize")


@test
def crash_add(t):
    hits = discover(t, "add", "cleaned", ["add", matrix.ADDED, "{staging}"])
    expect("add.committed" in hits and any(k.startswith("publish.") for k in hits), f"add's points: {hits}")
    matrix_for(t, "add")


@test
def crash_add_dual(t):
    matrix_for(t, "add-dual")


@test
def crash_remove(t):
    matrix_for(t, "remove")


@test
def crash_remove_present(t):
    matrix_for(t, "remove-present")


@test
def crash_gc(t):
    matrix_for(t, "gc")


@test
def crash_rebuild_catalog(t):
    matrix_for(t, "rebuild-catalog")


@test
def crash_convert(t):
    matrix_for(t, "convert")


@test
def crash_convert_raw(t):
    matrix_for(t, "convert-raw")


def replay(t):
    label, pn, mode, f = OPTS.case.split("|")
    point, _, n = pn.rpartition("@")
    state, args = next((s, a) for l, s, a in COMMANDS if l == label)
    outcome, results = run_case(t, label, state, args, point, int(n), mode, [f], keep=True)
    print(f"crash run: {outcome}")
    for f, code, problems in results:
        print(f"follow-up {f}: exit {code}")
        for x in problems:
            print(f"  {x}")
    expect(outcome == "crashed" and not any(pr for _, _, pr in results), "the case fails")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed")
    ap.add_argument("--case")
    OPTS, rest = ap.parse_known_args()
    if OPTS.seed is None:
        OPTS.seed = os.environ.get("CASMIG_CRASH_SEED") or datetime.date.today().isoformat()
    sys.argv = [sys.argv[0]] + rest
    matrix.skip_without_seams(sys.argv)
    if OPTS.case:
        harness.TESTS[:] = [replay]
        sys.argv.append("--keep")
    print(f"crash matrix: {'full' if OPTS.full else 'CI sample, seed ' + OPTS.seed}, {OPTS.jobs} jobs", flush=True)
    sys.exit(harness.main("e2e-crash"))
