#!/usr/bin/env python3
"""`casmig doctor [--json]` (issue 10, item 7): one read-only pass over the store's health. Each finding
is one line with its severity and what to do; exit 0 when healthy, 1 when anything was found; it never
takes or probes the store lock, so it runs beside a migrate."""
import fcntl
import os
import sqlite3
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, expect  # noqa: E402


def doctor(t, s):
    code, out, err = t.run(s, "--json", "doctor")
    import json
    return code, json.loads(out), err


def checks(report):
    return {(f["severity"], f["check"]) for f in report["findings"]}


@test
def a_healthy_store_exits_0_and_every_finding_names_what_to_do(t):
    s = t.store("doc-ok", 3)
    code, out, err = t.run(s, "doctor")
    expect(code == 0 and "healthy" in out, f"legacy store: {code} {out!r} {err!r}")
    t.run(s, "migrate", code=0)
    code, rep, _ = doctor(t, s)
    expect(code == 0 and rep["healthy"] and rep["findings"] == [] and rep["mode"] == "dual", f"{rep}")
    expect(rep["pending_bytes"] == 0 and rep["free_bytes"] > 0, f"space numbers: {rep}")


@test
def failures_over_five_percent_are_critical_and_fewer_a_warning(t):
    def extra(root):
        os.mkfifo(os.path.join(root, "pkg00", "fifo"))
    s = t.store("doc-fail", 30, extra)
    t.run(s, "migrate", code=1)
    code, rep, _ = doctor(t, s)
    expect(code == 1 and ("warning", "failures") in checks(rep), f"1 of 30 failed (3.3%): {rep['findings']}")
    msg = [f["message"] for f in rep["findings"] if f["check"] == "failures"][0]
    expect("pkg00" in msg and "--retry-failed" in msg, f"the finding names the package and what to do: {msg}")
    for i in (1, 2):
        os.mkfifo(os.path.join(s, f"pkg{i:02d}", "fifo"))
        put(os.path.join(s, f"pkg{i:02d}"), "LICENSE", b"changed\n")  # the tree changed: migrated again
    t.run(s, "verify", code=1)
    code, rep, _ = doctor(t, s)
    expect(code == 1 and ("critical", "failures") in checks(rep), f"3 of 30 failed (10%): {rep['findings']}")


@test
def quarantined_objects_temp_leftovers_and_a_damaged_catalog_are_found(t):
    s = t.store("doc-bad", 2)
    t.run(s, "migrate", code=0)
    os.makedirs(os.path.join(s, "migration", "corrupt"))
    put(os.path.join(s, "migration", "corrupt"), "ab" * 32 + ".1", b"bad")
    os.makedirs(os.path.join(s, "temp", "casmig-999999-0123456789abcdef"))  # a dead process's staging dir
    put(os.path.join(s, "temp"), "not-ours", b"x")
    code, rep, _ = doctor(t, s)
    expect(code == 1 and {("critical", "integrity"), ("warning", "temp")} <= checks(rep), f"{rep['findings']}")
    expect(sum(1 for f in rep["findings"] if f["check"] == "temp") == 2, f"stale and foreign temp entries: {rep}")
    # A live staging directory (its lock held) is not stale.
    live = os.path.join(s, "temp", "casmig-1-fedcba9876543210")
    os.makedirs(live)
    with open(os.path.join(live, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _, rep2, _ = doctor(t, s)
        stale = [x["message"] for x in rep2["findings"] if x["check"] == "temp" and "stopped" in x["message"]]
        expect(stale and stale[0].startswith("1 entry"), f"a live staging directory counted as stale: {stale}")
    # The lock: a holder is named, and doctor does not disturb it (no probe).
    with open(os.path.join(s, "migration", "lock"), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write("casmig migrate pid 4242\n")
        f.flush()
        _, rep3, _ = doctor(t, s)
        expect(rep3["lock_holder"] == "casmig migrate pid 4242", f"lock holder: {rep3['lock_holder']!r}")
    # A damaged catalog is critical and names the way back.
    db = os.path.join(s, "store.db")
    with open(db, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xff" * 4096)
    code, out, err = t.run(s, "doctor")
    expect(code == 1 and "critical: catalog" in out and ("rebuild-catalog" in out or "backup" in out),
           f"damaged catalog: {code} {out!r} {err!r}")


@test
def a_slow_last_run_is_a_warning(t):
    s = t.store("doc-slow", 6)
    t.run(s, "migrate", "--limit", "2", code=0)
    code, rep, _ = doctor(t, s)
    expect(("warning", "speed") not in checks(rep), f"a run of under 5 min says nothing of speed: {rep['findings']}")
    # The run's end row holds its start: as if 2 packages had taken an hour (2 per hour, under 60).
    harness.backdate_last_run(s, 3600)
    code, rep, _ = doctor(t, s)
    msg = [f["message"] for f in rep["findings"] if f["check"] == "speed"]
    expect(code == 1 and msg and "2 packages per hour" in msg[0] and "4 pending" in msg[0], f"{rep['findings']}")
    t.run(s, "migrate", code=0)  # nothing pending: no speed to worry about
    code, rep, _ = doctor(t, s)
    expect(code == 0, f"nothing pending: {rep['findings']}")


@test
def a_temp_that_is_a_symlink_is_critical(t):
    s = t.store("doc-temp", 2)
    t.run(s, "migrate", code=0)
    os.rename(os.path.join(s, "temp"), os.path.join(s, "temp.real"))
    os.symlink(os.path.join(t.work, "elsewhere"), os.path.join(s, "temp"))
    code, rep, _ = doctor(t, s)
    expect(code == 1 and ("critical", "temp") in checks(rep), f"temp/ a symlink: {rep['findings']}")
    t.run(s, "migrate", code=3)  # what doctor warns of


@test
def no_progress_for_days_is_a_warning(t):
    s = t.store("doc-stall", 3)
    t.run(s, "migrate", "pkg00", code=0)
    db = sqlite3.connect(os.path.join(s, "store.db"))
    db.execute("UPDATE journal SET at_ns = at_ns - 72 * 3600 * 1000000000")
    db.commit()
    db.close()
    code, rep, _ = doctor(t, s)
    expect(code == 1 and ("warning", "speed") in checks(rep), f"{rep['findings']}")
    t.run(s, "migrate", code=0)
    code, rep, _ = doctor(t, s)
    expect(code == 0, f"nothing pending any more: {rep['findings']}")


@test
def a_failed_verify_after_cutover_is_kept_until_a_verify_passes(t):
    # After cutover a verified package stays verified when its verify fails (its manifest is the truth),
    # but the failure must outlive the run: status, list, doctor and the metrics show it (schema 0006).
    import json
    s = t.store("doc-vfail", 3)
    t.run(s, "migrate", code=0)
    t.run(s, "cutover", code=0)
    t.run(s, "cleanup", code=0)
    others = {e["digest"] for p in ("pkg00", "pkg02") for e in t.json(s, "show", p)["entries"]}
    digest = [e["digest"] for e in t.json(s, "show", "pkg01")["entries"] if e["digest"] and e["digest"] not in others][0]
    obj = os.path.join(s, "objects", digest[:2], digest[2:])
    with open(obj, "rb") as f:
        saved = f.read()
    os.remove(obj)
    code, _, err = t.run(s, "verify", code=1)
    expect("pkg01" in err and digest in err, f"verify names the package and the object: {err!r}")
    # A later process, not the failed run, reports it.
    st = t.json(s, "status")
    vf = st["verify_failures"]
    expect(st["packages"]["verified"] == 3 and len(vf) == 1 and vf[0]["package"] == "pkg01" and digest in vf[0]["error"],
           f"status: {st['packages']} {vf}")
    code, out, _ = t.run(s, "status", code=0)
    expect("verify failed after cutover" in out and digest in out, f"status text: {out!r}")
    rows = t.json(s, "list", "--verify-failed")["packages"]
    expect([r["id"] for r in rows] == ["pkg01"] and digest in rows[0]["verify_error"], f"list --verify-failed: {rows}")
    code, out, _ = t.run(s, "list", code=0)
    line = [x for x in out.splitlines() if x.startswith("pkg01")][0]
    expect("verify after cutover failed" in line, f"list line: {line!r}")
    code, out, _ = t.run(s, "--json", "doctor")
    rep = json.loads(out)
    expect(code == 1 and ("critical", "integrity") in checks(rep), f"doctor: {rep['findings']}")
    metrics = os.path.join(t.work, "vfail.prom")
    t.run(s, "--metrics-file", metrics, "status", code=0)
    with open(metrics) as f:
        expect("casmig_packages_verify_failed 1\n" in f.read(), "metric casmig_packages_verify_failed")
    # Another failing verify does not add a journal row for the same failure.
    t.run(s, "verify", "pkg01", code=1)
    db = sqlite3.connect(os.path.join(s, "store.db"))
    n = db.execute("SELECT COUNT(*) FROM journal WHERE detail LIKE 'failed after cutover%'").fetchone()[0]
    db.close()
    expect(n == 1, f"journal rows for one failure: {n}")
    # The object is restored (as from a backup): the next verify passes and clears it everywhere.
    with open(obj, "wb") as f:
        f.write(saved)
    t.run(s, "verify", code=0)
    st = t.json(s, "status")
    expect(st["verify_failures"] == [], f"cleared: {st['verify_failures']}")
    expect(t.json(s, "list", "--verify-failed")["packages"] == [], "list --verify-failed after the fix")
    code, rep, _ = doctor(t, s)
    expect(code == 0, f"doctor after the fix: {rep['findings']}")
    # The same for an object whose content verify --objects finds wrong (same size, other bytes): it is
    # moved aside, and the packages that need it stay verified with the failure kept, not failed.
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(bytes(b ^ 0xFF for b in saved[:4]))
    os.chmod(obj, 0o444)
    code, _, err = t.run(s, "verify", "--objects-only", code=1)
    expect("pkg01" in err and "casmig remove" in err, f"verify --objects names the package and the way back: {err!r}")
    st = t.json(s, "status")
    expect(st["packages"]["verified"] == 3 and [f["package"] for f in st["verify_failures"]] == ["pkg01"],
           f"after verify --objects: {st['packages']} {st['verify_failures']}")
    with open(obj, "wb") as f:
        f.write(saved)
    t.run(s, "verify", code=0)
    expect(t.json(s, "status")["verify_failures"] == [], "cleared after the object is restored")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-doctor"))
