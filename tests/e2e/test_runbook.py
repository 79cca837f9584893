#!/usr/bin/env python3
"""docs/operations.md is executed as written (issue 10: the runbook's commands, run in order, all do
what it says). "The whole life of a store, in order" runs top to bottom on the built-in demo store
(tools/demo-store): every command exits as the block says (0 unless `# exit N`) and prints what its
`# expect:` comment says; at the end every package's tree is exactly the demo store's again. Each
scenario block (`<!-- runbook-test: NAME from=STAGE -->`) runs in one bash process on a fresh demo
store brought to STAGE, with the same checks per line (its text on stdout or stderr); afterwards a
rollback must give back every tree exactly: no recipe loses a file."""
import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, put, snapshot, expect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runbook():
    text = open(os.path.join(ROOT, "docs", "operations.md")).read()
    m = re.search(r"<!-- runbook-test -->\n```sh\n(.*?)```", text, re.S)
    expect(m, "docs/operations.md has no <!-- runbook-test --> block")
    steps = []
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        cmd, _, comment = line.partition("#")
        want_code = int(re.search(r"exit (\d+)", comment).group(1)) if re.search(r"exit (\d+)", comment) else 0
        want_text = comment.split("expect:", 1)[1].strip() if "expect:" in comment else None
        steps.append((cmd.strip(), want_code, want_text))
    return steps


@test
def the_runbook_runs_as_written_on_the_demo_store(t):
    store = os.path.join(t.work, "demo")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo-store"), store], check=True)
    before = {p: snapshot(os.path.join(store, p), owners=True) for p in sorted(os.listdir(store))}
    staging = os.path.join(t.work, "staging")
    put(staging, "bin/extra", b"#!/bin/sh\necho extra\n", 0o755)
    put(staging, "share/doc/README", b"an extra package\n")
    env = dict(os.environ, CASMIG_STORE=store, STAGING=staging,
               PATH=os.path.dirname(t.casmig) + os.pathsep + os.environ["PATH"])
    steps = runbook()
    expect(len(steps) >= 15 and steps[0][0].startswith("casmig "), f"runbook steps: {steps[:3]}")
    for cmd, want_code, want_text in steps:
        argv = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], a) for a in shlex.split(cmd)]
        expect(argv[0] == "casmig", f"not a casmig command: {cmd}")
        p = subprocess.run([t.casmig] + argv[1:], capture_output=True, text=True, env=env, timeout=600)
        expect(p.returncode == want_code, f"`{cmd}` exited {p.returncode}, the runbook says {want_code}:\n"
                                          f"{p.stdout[-500:]}\n{p.stderr[-500:]}")
        if want_text:
            expect(want_text in p.stdout, f"`{cmd}` does not print {want_text!r}:\n{p.stdout[-800:]}")
        if "--state failed" in cmd:
            expect(p.stdout.strip() == "", f"`{cmd}` lists failed packages:\n{p.stdout}")
        if "--state verified" in cmd:
            expect(len(p.stdout.strip().splitlines()) == 10, f"`{cmd}` after --limit 10:\n{p.stdout}")
    after = {p: snapshot(os.path.join(store, p), owners=True) for p in before}
    changed = [p for p in before if after[p] != before[p]]
    expect(not changed, f"after the runbook's rollback these trees are not exact: {changed[:5]}")


def scenarios():
    text = open(os.path.join(ROOT, "docs", "operations.md")).read()
    found = re.findall(r"<!-- runbook-test: (\S+) from=(\S+) -->\n```sh\n(.*?)```", text, re.S)
    out = []
    for name, stage, body in found:
        steps = []
        for line in body.splitlines():
            if not line.strip():
                continue
            cmd, _, comment = line.partition("  #")  # a comment is two spaces and '#' away from the command
            m = re.search(r"exit (\d+)", comment)
            want_text = comment.split("expect:", 1)[1].strip() if "expect:" in comment else None
            steps.append((cmd.strip(), int(m.group(1)) if m else 0, want_text))
        out.append((name, stage, steps))
    return out


STAGES = {"legacy": [], "migrated": [["migrate"]], "cleaned": [["migrate"], ["cutover"], ["cleanup"]]}


def run_scenario(t, name, stage, steps):
    store = os.path.join(t.work, "sc-" + name)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo-store"), store], check=True)
    before = {p: snapshot(os.path.join(store, p), owners=True) for p in sorted(os.listdir(store))}
    source = os.path.join(t.work, "sc-" + name + "-source")  # the package manager's unpacked packages
    subprocess.run(["cp", "-a", store, source], check=True)
    for args in STAGES[stage]:
        t.run(store, *args, code=0)
    steps_dir = os.path.join(t.work, "sc-" + name + "-steps")
    os.makedirs(steps_dir)
    script = ["set +e"]
    for i, (cmd, _, _) in enumerate(steps):
        script.append(f"{{ {cmd}\n}} >'{steps_dir}/{i}.out' 2>'{steps_dir}/{i}.err' </dev/null; echo $? >'{steps_dir}/{i}.rc'")
    env = dict(os.environ, CASMIG_STORE=store, PM_SOURCE=source, METRICS=os.path.join(t.work, name + ".prom"),
               PATH=os.path.dirname(t.casmig) + os.pathsep + os.environ["PATH"])
    env.pop("CASMIG_CONFIG", None)
    subprocess.run(["bash", "-c", "\n".join(script)], env=env, timeout=900, check=True)
    for i, (cmd, want_code, want_text) in enumerate(steps):
        rd = lambda ext: open(os.path.join(steps_dir, f"{i}.{ext}")).read()
        code, out, err = int(rd("rc")), rd("out"), rd("err")
        where = f"scenario {name}, `{cmd}`"
        expect(code == want_code, f"{where} exited {code}, the runbook says {want_code}:\n{out[-500:]}\n{err[-500:]}")
        if want_text == "(nothing)":
            expect(out.strip() == "" and err.strip() == "", f"{where} prints something:\n{out[-500:]}{err[-500:]}")
        elif want_text:
            expect(want_text in out or want_text in err, f"{where} does not print {want_text!r}:\n{out[-800:]}\n{err[-800:]}")
    # Whatever the recipe did, nothing is lost: a rollback gives back every tree of the demo store.
    t.run(store, "rollback", code=0)
    after = {p: snapshot(os.path.join(store, p), owners=True) for p in before}
    changed = [p for p in before if after[p] != before[p]]
    expect(not changed, f"scenario {name}: after a rollback these trees are not exact: {changed[:5]}")


@test
def every_scenario_of_the_runbook_runs_as_written(t):
    found = scenarios()
    names = [n for n, _, _ in found]
    for must in ("daily", "failed-package", "verify-failed", "rollback", "lost-catalog", "fleet"):
        expect(must in names, f"docs/operations.md lost its {must!r} recipe (found {names})")
    for name, stage, steps in found:
        expect(stage in STAGES and steps, f"scenario {name}: stage {stage!r}, {len(steps)} steps")
        run_scenario(t, name, stage, steps)


if __name__ == "__main__":
    sys.exit(harness.main("e2e-runbook"))
