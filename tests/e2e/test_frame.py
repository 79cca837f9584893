#!/usr/bin/env python3
"""The command line's frame (issue 10, items 1 and 4): --version, help, did-you-mean on a typo, the
config file, and seeing the store with list and show — all through the real binary."""
import fcntl
import json
import os
import re
import subprocess
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, expect  # noqa: E402

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_CODES_LINE = "Exit codes: 0 success"


def casmig(t, *args, env=None):
    """Runs casmig with exactly these arguments (no --store added): (exit code, stdout, stderr)."""
    p = subprocess.run([t.casmig] + [a if isinstance(a, bytes) else str(a) for a in args], capture_output=True,
                       env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def one_line(err, what):
    expect(err.count("\n") == 1 and err.endswith("\n"), f"{what}: not one line on stderr: {err!r}")


def commands_in_help(text):
    """The command names listed under 'Subcommands:' of casmig --help."""
    part = text.split("Subcommands:", 1)
    expect(len(part) == 2, f"--help lists no commands: {text!r}")
    names = []
    for line in part[1].splitlines():
        m = re.match(r"^  (\S+)", line)
        if m:
            names.append(m.group(1))
        elif line.strip() and not line.startswith("   "):
            break
    return names


def hold_lock(store):
    os.makedirs(os.path.join(store, "migration"), exist_ok=True)
    f = open(os.path.join(store, "migration", "lock"), "a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def tree_listing(root):
    out = []
    for d, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in dirs + files]
    return sorted(out)


# ------------------------------------------------------------------ --version, help

@test
def version_prints_the_projects_version(t):
    want = re.search(r"version:\s*'([^']+)'", open(os.path.join(SOURCE_ROOT, "meson.build")).read()).group(1)
    code, out, err = casmig(t, "--version")
    expect(code == 0 and out == f"casmig {want}\n" and err == "", f"--version: {code} {out!r} {err!r}")
    code, out, _ = casmig(t, "status", "--version")  # a global option, after the command too
    expect(code == 0 and out == f"casmig {want}\n", f"status --version: {code} {out!r}")


@test
def help_and_help_command_print_what_dash_dash_help_prints(t):
    code, top, _ = casmig(t, "--help")
    expect(code == 0, "--help failed")
    code, out, err = casmig(t, "help")
    expect(code == 0 and out == top, f"casmig help differs from --help: {code} {err!r}\n{out}")
    expect("Example: casmig" in top and "3 refused" in top.rstrip().splitlines()[-2]
           and top.rstrip().splitlines()[-1].lstrip().startswith("130/143"),
           f"--help does not end with an example and the exit codes: {top[-400:]!r}")
    commands = commands_in_help(top)
    for c in ["plan", "migrate", "status", "list", "show", "verify", "cutover", "cleanup", "rollback",
              "materialize", "add", "remove", "gc", "rebuild-catalog", "help"]:
        expect(c in commands, f"--help does not list {c}: {commands}")
    for c in commands:
        code, want, _ = casmig(t, c, "--help")
        expect(code == 0, f"{c} --help exited {code}")
        code, out, err = casmig(t, "help", c)
        expect(code == 0 and out == want, f"help {c} differs from {c} --help: {code} {err!r}")
        lines = want.rstrip().splitlines()
        examples = [l for l in lines if l.startswith("Example: ")]
        expect(len(examples) == 1 and examples[0].startswith(f"Example: casmig ") and f" {c}" in examples[0],
               f"{c} --help: no single example of {c}: {examples}")
        expect(EXIT_CODES_LINE in want and lines[-2].lstrip().startswith("3 refused")
               and "4 busy" in lines[-2] and lines[-1].lstrip().startswith("130/143"),
               f"{c} --help does not end with the exit codes: {lines[-3:]}")
        expect(lines.index(examples[0]) > max(i for i, l in enumerate(lines) if l.strip().startswith("-")),
               f"{c} --help: the example is not at the end: {want!r}")
    code, out, err = casmig(t, "help", "migrat")
    expect(code == 2 and out == "", f"help migrat: {code} {out!r}")
    one_line(err, "help migrat")
    expect("'migrat'" in err and "did you mean 'migrate'" in err, f"help migrat: {err!r}")


# ------------------------------------------------------------------ typos

@test
def a_typo_names_itself_and_the_closest_command_or_option(t):
    s = t.store("typos", 2)
    before = tree_listing(s)
    for args, typo, near in [(["migrat"], "'migrat'", "'migrate'"),
                             (["--store", s, "stauts"], "'stauts'", "'status'"),
                             (["--store", s, "-j", "2", "verfy", "pkg00"], "'verfy'", "'verify'"),
                             (["--store", s, "migrate", "--limt", "3"], "'--limt'", "'--limit'"),
                             (["--store", s, "migrate", "--time-budgte=3m"], "'--time-budgte'", "'--time-budget'"),
                             (["--stor", s, "status"], "'--stor'", "'--store'"),
                             (["--store", s, "status", "--journl", "3"], "'--journl'", "'--journal'"),
                             (["--store", s, "list", "--stat", "failed"], "'--stat'", "'--state'")]:
        code, out, err = casmig(t, *args)
        expect(code == 2, f"{args}: exit {code}")
        one_line(err, " ".join(args))
        expect(f"unknown {'option' if typo.startswith(chr(39) + '-') else 'command'} {typo}" in err
               and f"did you mean {near}?" in err, f"{args}: {err!r}")
        expect("subcommand is required" not in err and "not expected" not in err, f"{args}: CLI11's message: {err!r}")
    code, _, err = casmig(t, "frobnicate")
    expect(code == 2 and "unknown command 'frobnicate'" in err and "did you mean" not in err, f"frobnicate: {err!r}")
    one_line(err, "frobnicate")
    code, _, err = casmig(t, "--store", s, "status", "--limit", "3")  # migrate's option, not status's
    expect(code == 2 and "unknown option '--limit' for status" in err, f"status --limit: {err!r}")
    one_line(err, "status --limit")
    code, _, err = casmig(t)
    expect(code == 2, f"no command: exit {code}")
    one_line(err, "no command")
    # With --json a usage error is one JSON document on stdout too (the line still goes to stderr).
    for args in (["--json", "--store", s, "migrat"], ["--json", "--store", s, "list", "--state", "bogus"],
                 ["--json", "--config", os.path.join(t.work, "no-such.toml"), "status"]):
        code, out, err = casmig(t, *args)
        doc = json.loads(out) if out.strip() else {}
        expect(code == 2 and doc.get("error", {}).get("kind") == "usage" and doc["error"]["exit_code"] == 2
               and doc["error"]["message"] in err, f"{args}: {code} {out!r} {err!r}")
    expect(tree_listing(s) == before, "a refused command line changed the store")


# ------------------------------------------------------------------ config file

def write_config(t, name, text):
    path = os.path.join(t.work, name)
    with open(path, "w") as f:
        f.write(text)
    return path


@test
def a_config_file_sets_store_and_limits_and_the_command_line_overrides_it(t):
    if os.path.exists("/etc/casmig.conf"):
        print("  (note: /etc/casmig.conf exists; the default-file case is not checked)")
    os.environ.pop("CASMIG_STORE", None)  # the file's store is used only without it (below)
    s = t.store("config", 5)
    # TOML: the store from the file, [migrate] limits from the file.
    conf = write_config(t, "casmig.toml", f'# casmig settings\nstore = "{s}"\nprogress = "never"\n\n'
                                          '[migrate]\nlimit = 2\ntime-budget = "1h"\nio-limit = "1G"\n')
    code, out, err = casmig(t, "--config", conf, "--json", "migrate")
    expect(code == 0 and json.loads(out)["migrated"] == 2, f"limit from the file: {code} {out!r} {err!r}")
    code, out, err = casmig(t, "--config", conf, "--json", "migrate", "--limit", "1")
    expect(code == 0 and json.loads(out)["migrated"] == 1, f"--limit overrides the file: {code} {out!r} {err!r}")
    # plan has its own section: [migrate] limit is migrate's (plan reports the two still pending).
    code, out, _ = casmig(t, "--config", conf, "--json", "plan")
    expect(code == 0 and json.loads(out)["packages"] == 2, f"plan took [migrate] limit: {out!r}")
    # The command line's --store overrides the file's.
    other = t.store("config-other", 1)
    code, out, _ = casmig(t, "--config", conf, "--store", other, "--json", "status")
    expect(code == 0 and json.loads(out)["packages"]["total"] == 1, f"--store overrides the file: {out!r}")
    # So does $CASMIG_STORE: a runbook's `export CASMIG_STORE=…` never acts on the store the file names.
    code, out, _ = casmig(t, "--config", conf, "--json", "status", env={"CASMIG_STORE": other})
    expect(code == 0 and json.loads(out)["packages"]["total"] == 1, f"$CASMIG_STORE overrides the file: {out!r}")
    code, out, _ = casmig(t, "--config", conf, "--store", s, "--json", "status", env={"CASMIG_STORE": other})
    expect(code == 0 and json.loads(out)["packages"]["total"] == 5, f"--store overrides $CASMIG_STORE: {out!r}")
    # A value from the file is checked like one from the command line (the key reaches the option).
    bad = write_config(t, "bad-io.toml", f'store = "{s}"\n[migrate]\nio-limit = "fast"\n')
    code, _, err = casmig(t, "--config", bad, "migrate")
    expect(code == 2 and "--io-limit" in err and "fast" in err and bad in err,
           f"bad io-limit from the file (named with the file): {code} {err!r}")
    one_line(err, "bad io-limit")
    code, _, err = casmig(t, "--config", bad, "migrate", "--io-limit", "slow")  # the command line's own value
    expect(code == 2 and "slow" in err and bad not in err, f"bad --io-limit on the command line: {code} {err!r}")
    zero = write_config(t, "bad-limit.toml", f'store = "{s}"\n[migrate]\nlimit = 0\n')
    code, _, err = casmig(t, "--config", zero, "migrate")
    expect(code == 2 and "--limit" in err and zero in err, f"limit = 0 from the file: {code} {err!r}")
    one_line(err, "limit = 0")
    code, _, _ = casmig(t, "--config", bad, "status")  # [migrate] values stop no other command
    expect(code == 0, f"status with a bad [migrate] value: {code}")
    bad = write_config(t, "bad-jobs.ini", f"store={s}\njobs=0\n")
    code, _, err = casmig(t, "--config", bad, "status")
    expect(code == 2 and "jobs" in err and bad in err, f"jobs=0 from an INI file (named with the file): {code} {err!r}")
    one_line(err, "jobs=0")
    code, _, err = casmig(t, "--config", bad, "-j", "0", "status")
    expect(code == 2 and "jobs" in err and bad not in err, f"-j 0 on the command line: {code} {err!r}")
    # INI spelling, and [plan] limits for plan.
    ini = write_config(t, "casmig.ini", f"store={s}\n[plan]\nlimit=1\n")
    code, out, err = casmig(t, "--config", ini, "--json", "plan")
    expect(code == 0 and json.loads(out)["packages"] == 1, f"[plan] limit: {code} {out!r} {err!r}")
    code, out, _ = casmig(t, "--config", conf, "--json", "migrate")
    expect(json.loads(out)["migrated"] == 2, f"the rest: {out!r}")
    expect(json.loads(casmig(t, "--store", s, "--json", "status")[1])["packages"]["verified"] == 5, "not all verified")


@test
def the_example_config_file_of_the_runbook_works(t):
    doc = open(os.path.join(SOURCE_ROOT, "docs", "operations.md")).read()
    m = re.search(r"```toml\n(.*?)```", doc, re.S)
    expect(m, "docs/operations.md has no TOML example")
    s = t.store("config-doc", 3)
    conf = write_config(t, "doc.conf", m.group(1).replace("/opt/pm/store", s))
    code, out, err = casmig(t, "--config", conf, "--json", "migrate")
    expect(code == 0 and json.loads(out)["migrated"] == 3, f"the runbook's config: {code} {out!r} {err!r}")
    code, out, err = casmig(t, "--config", conf, "status")  # quiet = true: nothing on stdout
    expect(code == 0 and out == "" and err == "", f"quiet from the file: {code} {out!r} {err!r}")


@test
def a_config_file_with_an_unknown_key_or_a_missing_config_file_is_a_usage_error(t):
    s = t.store("config-bad", 1)
    before = tree_listing(s)
    for name, text, want in [
            ("typo.toml", f'store = "{s}"\n[migrate]\nlimt = 3\n', ["'limt' in [migrate]", "did you mean 'limit' in [migrate]"]),
            ("top.toml", f'store = "{s}"\nlimit = 3\n', ["'limit'", "did you mean 'limit' in [migrate]"]),
            ("section.toml", f'store = "{s}"\n[migrat]\nlimit = 3\n', ["section [migrat]", "did you mean [migrate]"]),
            ("global.toml", f'stor = "{s}"\n', ["'stor'", "did you mean 'store'"]),
            ("nonsense.toml", f'store = "{s}"\ncolour = "blue"\n', ["'colour'"])]:
        conf = write_config(t, name, text)
        code, out, err = casmig(t, "--config", conf, "status")
        expect(code == 2 and out == "", f"{name}: exit {code} {out!r}")
        one_line(err, name)
        expect("unknown " in err and conf in err and all(w in err for w in want), f"{name}: {err!r}")
    # Options that change what a command does to the store are command-line only.
    conf = write_config(t, "retry.toml", f'store = "{s}"\n[migrate]\nretry-failed = true\n')
    code, _, err = casmig(t, "--config", conf, "status")
    expect(code == 2 and "retry-failed" in err and "command line" in err, f"retry-failed in the file: {code} {err!r}")
    one_line(err, "retry-failed")
    conf = write_config(t, "json.toml", f'store = "{s}"\njson = true\n')
    code, out, err = casmig(t, "--config", conf, "status")
    expect(code == 2 and "json" in err, f"json in the file: {code} {err!r}")
    missing = os.path.join(t.work, "no-such.conf")
    code, out, err = casmig(t, "--config", missing, "--store", s, "status")
    expect(code == 2 and missing in err, f"missing --config file: {code} {err!r}")
    one_line(err, "missing --config")
    code, _, err = casmig(t, "--config", t.work, "--store", s, "status")  # a directory
    expect(code == 2 and t.work in err, f"a directory as --config: {code} {err!r}")
    expect(tree_listing(s) == before, "a refused config changed the store")


# ------------------------------------------------------------------ list

@test
def list_shows_every_package_with_its_state_and_filters_by_state(t):
    def extra(root):
        put(os.path.join(root, "zz-fifo"), "ok", b"fine")
        os.mkfifo(os.path.join(root, "zz-fifo", "pipe"))
    s = t.store("list", 3, extra)
    t.run(s, "migrate", code=1)
    os.makedirs(os.path.join(s, "new-one"))  # appeared since: not in the catalog yet
    put(os.path.join(s, "new-one"), "f", b"x")
    with hold_lock(s):  # list takes no lock: it works beside a running command
        rows = t.json(s, "list")["packages"]
        _, text, err = t.run(s, "list", code=0)
    expect([r["id"] for r in rows] == ["new-one", "pkg00", "pkg01", "pkg02", "zz-fifo"], f"ids: {rows}")
    for r in rows:
        expect(set(r) == {"id", "state", "tree", "files", "bytes", "error", "verify_error"}, f"keys: {r}")
    by = {r["id"]: r for r in rows}
    for i in range(3):
        r = by[f"pkg0{i}"]
        expect(r["state"] == "verified" and r["tree"] == "present" and r["files"] == 3 and
               r["bytes"] == 300 + 3000 + i and r["error"] is None, f"pkg0{i}: {r}")
    f = by["zz-fifo"]
    expect(f["state"] == "failed" and f["files"] is None and "pipe" in f["error"] and "fifo" in f["error"], f"failed: {f}")
    n = by["new-one"]
    expect(n["state"] == "pending" and n["tree"] == "present" and n["files"] is None and n["error"] is None, f"new: {n}")
    lines = text.splitlines()
    expect(len(lines) == 5 and err == "", f"text: {text!r} {err!r}")
    fifo_line = [l for l in lines if l.startswith("zz-fifo ")]
    expect(fifo_line and fifo_line[0].split()[1:3] == ["failed", "present"] and "pipe" in fifo_line[0],
           f"failed line: {lines}")
    expect(lines[1].split()[:5] == ["pkg00", "verified", "present", "3", "3300"], f"pkg00 line: {lines[1]!r}")
    # --state filters.
    _, out, _ = t.run(s, "list", "--state", "failed", code=0)
    expect(len(out.splitlines()) == 1 and out.startswith("zz-fifo "), f"--state failed: {out!r}")
    got = [r["id"] for r in t.json(s, "list", "--state", "verified")["packages"]]
    expect(got == ["pkg00", "pkg01", "pkg02"], f"--state verified: {got}")
    expect(t.json(s, "list", "--state", "rolled_back")["packages"] == [], "--state rolled_back")
    code, _, err = t.run(s, "list", "--state", "broken")
    expect(code == 2 and "broken" in err, f"a bad state: {code} {err!r}")


@test
def list_on_a_legacy_store_without_a_catalog_writes_nothing(t):
    s = t.store("list-legacy", 3)
    os.makedirs(os.fsencode(os.path.join(s, "odd-")) + b"\xff")  # a package id that is not UTF-8
    before = tree_listing(s)
    rows = t.json(s, "list")["packages"]
    expect([r["id"] for r in rows] == ["odd-\\xff", "pkg00", "pkg01", "pkg02"], f"ids: {rows}")
    expect(all(r["state"] == "pending" and r["tree"] == "present" and r["files"] is None and r["bytes"] is None
               for r in rows), f"rows: {rows}")
    _, text, _ = t.run(s, "list", code=0)
    expect(len(text.splitlines()) == 4 and text.startswith("odd-\\xff "), f"text: {text!r}")
    expect(tree_listing(s) == before and not os.path.exists(os.path.join(s, "store.db")), "list wrote to the store")


@test
def a_package_id_that_is_not_utf8_is_typed_as_list_prints_it(t):
    """list prints a byte that is not printable UTF-8 as \\xNN: show, verify, migrate and materialize
    take that spelling back (and a backslash in an id is \\x5c)."""
    s = t.store("typed-ids", 1)
    odd = os.fsencode(os.path.join(s, "odd-")) + b"\xff"
    slash = os.fsencode(os.path.join(s, "back\\slash"))
    literal = os.fsencode(os.path.join(s, "lit\\x41"))  # spelled like an escape, and there as it is
    for d in (odd, slash, literal):
        os.makedirs(d)
        with open(os.path.join(d, b"file"), "wb") as f:
            f.write(b"content of " + os.path.basename(d))
    ids = [r["id"] for r in t.json(s, "list")["packages"]]
    expect(ids == ["back\\x5cslash", "lit\\x5cx41", "odd-\\xff", "pkg00"], f"ids: {ids}")
    t.run(s, "migrate", "odd-\\xff", "back\\x5cslash", code=0)
    states = {r["id"]: r["state"] for r in t.json(s, "list")["packages"]}
    expect(states == {"back\\x5cslash": "verified", "lit\\x5cx41": "pending", "odd-\\xff": "verified", "pkg00": "pending"},
           f"states: {states}")
    shown = t.json(s, "show", "odd-\\xff")
    expect(shown["package"] == "odd-\\xff" and [e["path"] for e in shown["entries"] if e["type"] == "file"] == ["file"],
           f"show: {shown}")
    t.run(s, "verify", "odd-\\xff", "back\\x5cslash", code=0)
    t.run(s, "show", "back\\slash", code=0)  # not an escape: taken as typed
    expect(t.json(s, "show", "lit\\x41")["package"] == "lit\\x5cx41", "not list's spelling of anything: taken as typed")
    dest = os.path.join(t.work, "typed-ids-dest")
    t.run(s, "materialize", "odd-\\xff", dest, code=0)
    with open(os.path.join(dest, "file"), "rb") as f:
        expect(f.read() == b"content of odd-\xff", "materialized content")
    code, _, err = t.run(s, "show", "odd-\\xfe")
    expect(code != 0 and "odd-\\xfe" in err and len(err.strip().splitlines()) == 1, f"unknown id: {code} {err!r}")
    # Only list's own spelling is read back: "lit\\x2d1" is not one ("-" prints as itself), so add and
    # remove both take it literally and never touch "lit-1".
    os.makedirs(os.path.join(s, "lit-1"))
    put(os.path.join(s, "lit-1"), "file", b"lit-1's own")
    t.run(s, "migrate", "lit-1", code=0)
    staged = os.path.join(t.work, "typed-ids-staging")
    put(staged, "file", b"added under a backslashed id")
    t.run(s, "add", "lit\\x2d1", staged, code=0)
    ids = [r["id"] for r in t.json(s, "list")["packages"]]
    expect("lit\\x5cx2d1" in ids and "lit-1" in ids, f"ids after add: {ids}")
    t.run(s, "remove", "lit\\x2d1", code=0)
    ids = [r["id"] for r in t.json(s, "list")["packages"]]
    expect("lit\\x5cx2d1" not in ids and "lit-1" in ids, f"remove took the wrong package: {ids}")
    with open(os.path.join(s, "lit-1", "file"), "rb") as f:
        expect(f.read() == b"lit-1's own", "lit-1's tree was touched")


# ------------------------------------------------------------------ show

@test
def show_lists_a_migrated_packages_manifest_with_digests_in_path_order(t):
    s = t.store("show", 2)
    t.run(s, "migrate", code=0)
    with hold_lock(s):  # show takes no lock
        doc = t.json(s, "show", "pkg00")
        code, text, err = t.run(s, "show", "pkg00")
    expect(code == 0 and err == "", f"show: {code} {err!r}")
    expect(doc["package"] == "pkg00" and doc["source"] == "manifest", f"doc: {doc}")
    es = doc["entries"]
    paths = [e["path"] for e in es]
    expect(paths == sorted(paths, key=os.fsencode) and paths[0] == "", f"not in path order: {paths}")
    expect(set(paths) == {""} | set(tree_listing(os.path.join(s, "pkg00"))), f"paths: {paths}")
    by = {e["path"]: e for e in es}
    for p in ["LICENSE", "bin/tool0", "share/empty"]:
        e = by[p]
        data = open(os.path.join(s, "pkg00", p), "rb").read()
        obj = os.path.join(s, "objects", e["digest"][:2], e["digest"][2:])
        expect(e["type"] == "file" and e["size"] == len(data) and re.fullmatch("[0-9a-f]{64}", e["digest"]) and
               os.path.isfile(obj) and open(obj, "rb").read() == data, f"{p}: {e}")
    expect(by["bin/tool0"]["mode"] == 0o755 and by["LICENSE"]["mode"] == 0o644, "modes")
    expect(by["bin/alias"]["type"] == "symlink" and by["bin/alias"]["target"] == "tool0" and
           by["bin/alias"]["digest"] is None, f"symlink: {by['bin/alias']}")
    expect(by["share/empty-dir"]["type"] == "dir" and by["share/empty-dir"]["digest"] is None, "dir")
    lines = text.splitlines()
    expect(len(lines) == len(es), f"one line per entry: {text!r}")
    lic = [l for l in lines if l.endswith(" /LICENSE")]
    expect(lic and lic[0].split()[:4] == ["-", "0644", "300", by["LICENSE"]["digest"]], f"LICENSE line: {lic}")
    expect(any(l.startswith("- 0755 ") and l.endswith(" /bin/tool0") for l in lines), f"tool0 line: {lines}")
    alias = [l for l in lines if "/bin/alias" in l]
    expect(alias and alias[0].startswith("l ") and alias[0].endswith("/bin/alias -> tool0") and
           alias[0].split()[3] == "-", f"alias line: {alias}")
    expect(lines[0].startswith("d ") and lines[0].endswith(" /"), f"root line: {lines[0]!r}")


@test
def show_walks_a_legacy_package_and_refuses_what_is_no_package(t):
    s = t.store("show-legacy", 2)
    doc = t.json(s, "show", "pkg01")
    expect(doc["source"] == "legacy_tree" and all(e["digest"] is None for e in doc["entries"]), f"legacy: {doc}")
    expect({e["path"] for e in doc["entries"]} == {""} | set(tree_listing(os.path.join(s, "pkg01"))), "paths")
    by = {e["path"]: e for e in doc["entries"]}
    expect(by["bin/alias"]["target"] == "tool1" and by["bin/tool1"]["size"] == 3001, f"{by['bin/alias']}")
    _, text, _ = t.run(s, "show", "pkg01", code=0)
    expect(all(l.split()[3] == "-" for l in text.splitlines()), f"a digest in a legacy walk: {text!r}")
    expect(not os.path.exists(os.path.join(s, "store.db")), "show wrote a catalog")
    t.run(s, "migrate", "pkg00", code=0)
    for name in ["no-such-pkg", "objects", "migration", "temp", "packages", ".hidden", "../show-legacy"]:
        code, out, err = t.run(s, "show", name)
        expect(code == 2 and out == "", f"show {name}: exit {code} {out!r}")
        one_line(err, f"show {name}")
        expect(name in err and "casmig list" in err, f"show {name}: {err!r}")
    # A package walk that meets something it cannot show names the package and the path (exit 1).
    os.mkfifo(os.path.join(s, "pkg01", "pipe"))
    code, _, err = t.run(s, "show", "pkg01")
    expect(code == 1 and "pkg01" in err and "pipe" in err and "fifo" in err, f"fifo: {code} {err!r}")
    one_line(err, "show fifo")


@test
def show_and_list_print_paths_that_are_not_utf8_escaped(t):
    s = t.store("show-bytes", 1)
    pkg = os.fsencode(os.path.join(s, "pkg00"))
    names = {b"caf\xe9": "caf\\xe9", b"\xf8\x80\x80": "\\xf8\\x80\\x80", b"sur\xed\xa0\x80": "sur\\xed\\xa0\\x80",
             b"back\\slash": "back\\x5cslash", b"new\nline": "new\\x0aline", "ünï".encode(): "ünï"}
    for raw in names:
        with open(os.path.join(pkg, raw), "wb") as f:
            f.write(raw)
    for phase in ("legacy", "migrated"):
        if phase == "migrated":
            t.run(s, "migrate", code=0)
        code, out, err = t.run(s, "--json", "show", "pkg00")
        expect(code == 0, f"{phase}: show --json exited {code}: {err!r}")
        paths = {e["path"] for e in json.loads(out)["entries"]}
        for raw, shown in names.items():
            expect(shown in paths, f"{phase}: {raw!r} not shown as {shown!r}: {sorted(paths)}")
        code, out, err = t.run(s, "show", "pkg00")
        expect(code == 0, f"{phase}: show exited {code}: {err!r}")
        for raw, shown in names.items():
            expect(any(l.endswith(" /" + shown) for l in out.splitlines()), f"{phase}: no line for {shown!r}: {out!r}")
        expect(len(out.splitlines()) == 8 + len(names), f"{phase}: a name broke a line: {out!r}")  # 8: the tree of t.store


# ------------------------------------------------------------------ errors point at list

@test
def an_unknown_package_points_at_casmig_list(t):
    s = t.store("point", 1)
    t.run(s, "migrate", code=0)
    for args in (["verify", "nope"], ["materialize", "nope", os.path.join(t.work, "dest")], ["remove", "nope"]):
        code, _, err = t.run(s, *args)
        expect(code == 2 and "nope" in err and "casmig list" in err and "casmig status" not in err,
               f"{args}: {code} {err!r}")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-frame"))
