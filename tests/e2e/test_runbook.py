#!/usr/bin/env python3
"""docs/operations.md "The whole life of a store, in order" is executed as written, top to bottom, on
the built-in demo store (tools/demo-store): every command exits as the block says (0 unless `# exit N`)
and prints what its `# expect:` comment says; at the end every package's tree is exactly the demo
store's again (issue 10: the runbook's commands, run in order, all do what it says)."""
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


if __name__ == "__main__":
    sys.exit(harness.main("e2e-runbook"))
