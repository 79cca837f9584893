#!/usr/bin/env python3
"""`--metrics-file PATH` (issue 10, item 6): Prometheus text format for node_exporter's textfile
collector, replaced atomically at the end of every run (failed ones included), checked here by a strict
parser of the exposition format (promtool's rules: names, labels, escapes, HELP/TYPE before samples,
one group per metric, no duplicate series, float values, final newline)."""
import fcntl
import math
import os
import re
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, expect  # noqa: E402

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse(text):
    """{(name, ((label, value), ...)): float}; raises ValueError on anything promtool would reject."""
    if not text.endswith("\n"):
        raise ValueError("no final newline")
    types, helps, series, done, current = {}, set(), {}, set(), None
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME.match(name):
                    raise ValueError(f"line {n}: bad metric name {name!r}")
                if parts[1] == "TYPE":
                    if name in types or len(parts) != 4 or parts[3] not in ("counter", "gauge", "histogram", "summary", "untyped"):
                        raise ValueError(f"line {n}: bad or second TYPE for {name}")
                    if any(k[0] == name for k in series):
                        raise ValueError(f"line {n}: TYPE of {name} after its samples")
                    types[name] = parts[3]
                else:
                    if name in helps or len(parts) != 4:
                        raise ValueError(f"line {n}: bad or second HELP for {name}")
                    helps.add(name)
            continue
        if not line.strip():
            raise ValueError(f"line {n}: empty line")
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ([^ ]+)( -?\d+)?$", line)
        if not m:
            raise ValueError(f"line {n}: not a sample: {line!r}")
        name, labels_text, value = m.group(1), m.group(3), m.group(4)
        labels = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = LABEL.match(labels_text, pos)
                if not lm:
                    raise ValueError(f"line {n}: bad labels {labels_text!r}")
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
                if pos < len(labels_text):
                    if labels_text[pos] != ",":
                        raise ValueError(f"line {n}: bad labels {labels_text!r}")
                    pos += 1
            if len({k for k, _ in labels}) != len(labels):
                raise ValueError(f"line {n}: repeated label")
        if name != current:
            if name in done:
                raise ValueError(f"line {n}: samples of {name} are not one group")
            if current:
                done.add(current)
            current = name
        key = (name, tuple(sorted(labels)))
        if key in series:
            raise ValueError(f"line {n}: duplicate series {key}")
        if value not in ("+Inf", "-Inf", "NaN"):
            float(value)  # raises ValueError
        series[key] = float(value) if value not in ("+Inf", "-Inf", "NaN") else math.nan
    return series


def get(series, name, **labels):
    return series.get((name, tuple(sorted(labels.items()))))


@test
def the_strict_parser_rejects_what_promtool_rejects(t):
    good = "# HELP x a thing\n# TYPE x gauge\nx{a=\"1\"} 2\nx{a=\"2\"} 3.5\n"
    expect(len(parse(good)) == 2, "a good file")
    for bad in [good[:-1], good + "x{a=\"1\"} 4\n", good.replace("gauge", "gauges"), good + "y 1\nx{a=\"3\"} 1\n",
                good.replace('a="1"', 'a="1'), good.replace("2\n", "two\n", 1), good + "1bad 3\n",
                "x 1\n# TYPE x gauge\n", good.replace('a="2"', 'a="\\q"')]:
        try:
            parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"the parser accepted {bad!r}")


@test
def every_run_writes_the_store_counts_and_its_outcome(t):
    s = t.store("metrics", 3, extra=lambda root: os.mkfifo(os.path.join(root, "pkg02", "fifo")))
    prom = os.path.join(t.work, "textfile", "casmig.prom")
    os.makedirs(os.path.dirname(prom))
    t.run(s, "--metrics-file", prom, "migrate", code=1)
    m = parse(open(prom).read())
    expect(get(m, "casmig_packages", state="verified") == 2 and get(m, "casmig_packages", state="failed") == 1,
           f"package states: {m}")
    expect(get(m, "casmig_last_run_exit_code", command="migrate") == 1 and
           get(m, "casmig_last_run_failures", command="migrate") == 1, "the failed run's outcome")
    expect(get(m, "casmig_last_success_timestamp_seconds", command="migrate") is None, "a failed run counted as success")
    expect(get(m, "casmig_store_mode", mode="dual") == 1 and get(m, "casmig_objects") > 0, "mode and objects")
    expect(get(m, "casmig_saved_bytes") == get(m, "casmig_logical_bytes") - get(m, "casmig_stored_bytes"), "saved bytes")
    ino = os.stat(prom).st_ino
    os.remove(os.path.join(s, "pkg02", "fifo"))
    t.run(s, "--metrics-file", prom, "migrate", "--retry-failed", code=0)
    m = parse(open(prom).read())
    expect(get(m, "casmig_last_run_exit_code", command="migrate") == 0 and
           get(m, "casmig_last_success_timestamp_seconds", command="migrate") > 1e9, "the successful run")
    expect(os.stat(prom).st_ino != ino, "the file was rewritten in place, not replaced")
    expect(os.listdir(os.path.dirname(prom)) == ["casmig.prom"], f"temp files left: {os.listdir(os.path.dirname(prom))}")
    # Another command keeps migrate's last run; a busy run is recorded with exit code 4.
    with open(os.path.join(s, "migration", "lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t.run(s, "--metrics-file", prom, "verify", code=4)
    m = parse(open(prom).read())
    expect(get(m, "casmig_last_run_exit_code", command="verify") == 4, "the busy verify")
    expect(get(m, "casmig_last_run_exit_code", command="migrate") == 0 and
           get(m, "casmig_last_success_timestamp_seconds", command="migrate") > 1e9, "migrate's lines were dropped")
    expect(get(m, "casmig_packages", state="verified") == 3, "counts after the rerun")
    # A run the timer cannot even start (a bad option value, a bad config file) is recorded too: exit 2.
    t.run(s, "--metrics-file", prom, "migrate", "--limit", "abc", code=2)
    m = parse(open(prom).read())
    expect(get(m, "casmig_last_run_exit_code", command="migrate") == 2, "a usage error of migrate")
    conf = os.path.join(t.work, "bad-key.toml")
    with open(conf, "w") as f:
        f.write("[migrate]\nlimt = 3\n")
    t.run(s, "--config", conf, "--metrics-file", prom, "verify", code=2)
    m = parse(open(prom).read())
    expect(get(m, "casmig_last_run_exit_code", command="verify") == 2 and
           get(m, "casmig_last_success_timestamp_seconds", command="migrate") > 1e9, "a bad config file")


@test
def an_unwritable_metrics_file_is_a_warning_not_a_failure(t):
    s = t.store("metrics-ro", 1)
    code, out, err = t.run(s, "--metrics-file", os.path.join(t.work, "no-such-dir", "x.prom"), "migrate")
    expect(code == 0 and "metrics file" in err and "no-such-dir" in err and len(err.strip().splitlines()) == 1,
           f"{code} {err!r}")


@test
def json_carries_every_problem_and_errors_as_an_error_object(t):
    """--json: one document on stdout in every case: the command's keys plus "problems" (package, path,
    message, warning), or {"error": {kind, message, exit_code}} when the command stops on an error."""
    import json
    s = t.store("json-problems", 2, extra=lambda root: os.mkfifo(os.path.join(root, "pkg01", "a-fifo")))
    code, out, err = t.run(s, "--json", "migrate")
    doc = json.loads(out)
    expect(code == 1 and doc["failed"] == 1, f"{code} {doc}")
    expect([(p["package"], p["path"], p["warning"]) for p in doc["problems"]] == [("pkg01", "a-fifo", False)]
           and "fifo" in doc["problems"][0]["message"], f"problems: {doc['problems']}")
    expect("a-fifo" in err, "the problem also goes to stderr")
    code, out, _ = t.run(s, "--json", "status")
    expect(code == 0 and json.loads(out)["problems"] == [], "a clean run has an empty problems list")
    for args, want_code, kind in [(["remove", "no-such"], 2, "usage"), (["cleanup"], 3, "refused")]:
        code, out, err = t.run(s, "--json", *args)
        doc = json.loads(out)
        expect(code == want_code and doc["error"]["kind"] == kind and doc["error"]["exit_code"] == want_code
               and doc["error"]["message"] and doc["error"]["message"] in err, f"{args}: {code} {out!r} {err!r}")
    with open(os.path.join(s, "migration", "lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, _ = t.run(s, "--json", "verify")
        expect(code == 4 and json.loads(out)["error"]["kind"] == "busy", f"busy: {code} {out!r}")


@test
def status_shows_the_last_run_its_pace_the_eta_and_the_lock_holder(t):
    import json
    s = t.store("status-extras", 4)
    st = json.loads(t.run(s, "--json", "status", code=0)[1])
    expect(st["last_migrate"] is None and st["lock_holder"] is None and st["eta_seconds"] is None,
           f"before any migrate: {st}")
    t.run(s, "migrate", "pkg00", "pkg01", code=0)
    st = json.loads(t.run(s, "--json", "status", code=0)[1])
    lm = st["last_migrate"]
    expect(lm["migrated"] == 2 and lm["failed"] == 0 and lm["files"] == 6 and lm["bytes"] > 0 and
           lm["started"] <= lm["ended"] and "pid" in lm["by"] and lm["result"] == "completed", f"last_migrate: {lm}")
    # A run of under a second gives no pace to predict from.
    expect(st["eta_seconds"] is None, f"eta after a run of {lm['seconds']} s: {st['eta_seconds']}")
    # The run's end row holds its start: one that started 10 s before its end predicts 10 s for 2 more.
    harness.backdate_last_run(s, 10)
    st = json.loads(t.run(s, "--json", "status", code=0)[1])
    expect(9 <= st["eta_seconds"] <= 11 and 9.5 <= st["last_migrate"]["seconds"] <= 10.5,
           f"eta from a 10 s run: {st['eta_seconds']}, {st['last_migrate']}")
    # A run that wrote no end row (killed with -9, or still running) says so.
    db = sqlite3.connect(os.path.join(s, "store.db"))
    db.execute("DELETE FROM journal WHERE detail LIKE 'run ended:%'")
    db.commit()
    db.close()
    st = json.loads(t.run(s, "--json", "status", code=0)[1])
    expect(st["last_migrate"]["result"] is None, f"no end row: {st['last_migrate']}")
    expect("no end recorded" in t.run(s, "status", code=0)[1], "the text says the run left no end")
    with open(os.path.join(s, "migration", "lock"), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate(0)
        f.write("casmig migrate pid 777\n")
        f.flush()
        st = json.loads(t.run(s, "--json", "status", code=0)[1])
        expect(st["lock_holder"] == "casmig migrate pid 777", f"lock holder: {st['lock_holder']!r}")
        code, out, _ = t.run(s, "status", code=0)
        expect("held by casmig migrate pid 777" in out and "last run   migrate" in out, out)
    t.run(s, "migrate", code=0)
    st = json.loads(t.run(s, "--json", "status", code=0)[1])
    expect(st["eta_seconds"] == 0 and st["last_migrate"]["migrated"] == 2, f"after the rest: {st}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-metrics"))
