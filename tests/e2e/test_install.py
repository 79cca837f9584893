#!/usr/bin/env python3
"""`meson install --destdir` puts every artefact an admin needs in place (issue 10, item 9): the binary,
the library, its header and casmig.pc, the man page (rendered by `man -l`), bash completion (which
completes commands, options and package ids), the nightly systemd units (`systemd-analyze verify` has
nothing to say about them), the license matching meson's license field, and the docs."""
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, expect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_installed = {}


def installed(t):
    """{basename: path} of every file `meson install --destdir` wrote (installed once per run)."""
    if not _installed:
        dest = os.path.join(t.work, "destdir")
        build = os.path.dirname(t.casmig)
        p = subprocess.run(["meson", "install", "-C", build, "--destdir", dest, "--no-rebuild", "--quiet"],
                           capture_output=True, text=True)
        expect(p.returncode == 0, f"meson install: {p.stdout[-400:]} {p.stderr[-400:]}")
        for d, _, fs in os.walk(dest):
            for f in fs:
                _installed[os.path.relpath(os.path.join(d, f), dest)] = os.path.join(d, f)
    return _installed


def one(files, pattern):
    hits = [p for rel, p in files.items() if re.search(pattern, rel)]
    expect(len(hits) == 1, f"expected one installed file matching {pattern}, found {sorted(hits)}")
    return hits[0]


@test
def meson_install_puts_every_artefact_in_place(t):
    files = installed(t)
    for pattern in [r"bin/casmig$", r"lib/.*libcasmig\.so\.0\.\d+\.\d+$", r"include/casmig/casmig\.h$",
                    r"pkgconfig/casmig\.pc$", r"share/man/man1/casmig\.1$",
                    r"share/bash-completion/completions/casmig$", r"lib/systemd/system/casmig-migrate\.service$",
                    r"lib/systemd/system/casmig-migrate\.timer$", r"share/doc/casmig/LICENSE$",
                    r"share/doc/casmig/operations\.md$", r"share/doc/casmig/api\.md$"]:
        one(files, pattern)
    # The license file is the license meson declares.
    meson_license = re.search(r"license:\s*'([^']+)'", open(os.path.join(ROOT, "meson.build")).read()).group(1)
    text = open(one(files, r"share/doc/casmig/LICENSE$")).read()
    expect(meson_license == "MIT" and text.startswith("MIT License") and "WITHOUT WARRANTY" in text,
           f"LICENSE does not match meson's license field {meson_license!r}")
    # The unit runs the installed binary.
    unit = open(one(files, r"casmig-migrate\.service$")).read()
    exe = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
    expect(any(rel.endswith(exe.lstrip("/")) for rel in files), f"ExecStart {exe} is not the installed binary")


@test
def the_man_page_renders(t):
    page = one(installed(t), r"man1/casmig\.1$")
    if not shutil.which("man"):
        raise AssertionError("man is needed (tools/bootstrap installs man-db)")
    p = subprocess.run(["man", "-l", page], capture_output=True, text=True,
                       env=dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat"))
    expect(p.returncode == 0 and not p.stderr.strip(), f"man -l: {p.returncode} {p.stderr[-300:]}")
    for words in ("casmig - migrate a package store", "SYNOPSIS", "EXIT STATUS", "cutover", "rollback",
                  "--lock-wait", "add PKG DIR", "CASMIG_STORE"):
        expect(words in p.stdout.replace("‐\n", "").replace("\u2010", "-"), f"the man page lacks {words!r}")
    # Every command the binary has is in the page.
    out = subprocess.run([t.casmig, "--help"], capture_output=True, text=True).stdout
    section = re.split(r"^subcommands:\s*$", out, flags=re.M | re.I)
    expect(len(section) == 2, f"casmig --help has no subcommand list: {out[-300:]!r}")
    cmds = re.findall(r"^\s{2}(\S+)\s{2,}", section[1], re.M)
    expect(len(cmds) >= 13, f"casmig --help lists too few commands: {cmds}")
    for c in cmds:
        expect(re.search(r"\b" + re.escape(c) + r"\b", p.stdout), f"the man page does not describe command {c}")


@test
def the_systemd_units_verify(t):
    if not shutil.which("systemd-analyze"):
        raise AssertionError("systemd-analyze is needed (tools/bootstrap installs systemd)")
    files = installed(t)
    d = os.path.join(t.work, "units")
    os.makedirs(d)
    for name in ("casmig-migrate.service", "casmig-migrate.timer"):
        text = open(one(files, re.escape(name) + "$")).read()
        # verify checks that ExecStart exists: point it at the installed copy under DESTDIR.
        exe = os.path.join(t.work, "destdir", os.path.relpath(one(files, r"bin/casmig$"), os.path.join(t.work, "destdir")))
        text = re.sub(r"^ExecStart=\S+", "ExecStart=" + exe, text, flags=re.M)
        open(os.path.join(d, name), "w").write(text)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", "casmig-migrate.service", "casmig-migrate.timer"],
                       cwd=d, capture_output=True, text=True)
    expect(p.returncode == 0 and not (p.stdout + p.stderr).strip(),
           f"systemd-analyze verify: {p.returncode} {(p.stdout + p.stderr).strip()[-600:]}")
    svc = open(os.path.join(d, "casmig-migrate.service")).read()
    for key in ("IOSchedulingClass=idle", "Nice=", "--time-budget", "--io-limit", "ProtectSystem=strict",
                "ReadWritePaths=", "--lock-wait", "--metrics-file"):
        expect(key in svc, f"the service lacks {key}")
    # A typo in a unit is seen (the check can fail).
    open(os.path.join(d, "casmig-migrate.service"), "a").write("IOSchedulingClas=idle\n")
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", "casmig-migrate.service"], cwd=d,
                       capture_output=True, text=True)
    expect("IOSchedulingClas" in p.stdout + p.stderr, "systemd-analyze verify did not notice a bad key")


@test
def bash_completion_completes_commands_options_and_packages(t):
    comp = one(installed(t), r"completions/casmig$")
    s = t.store("complete", 2)
    t.run(s, "migrate", "pkg00", code=0)
    bindir = os.path.dirname(t.casmig)

    def complete(*words):
        line = " ".join(words)
        script = (f"source '{comp}'; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                  f"_casmig; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                           env=dict(os.environ, PATH=bindir + ":" + os.environ["PATH"], CASMIG_STORE=s))
        expect(p.returncode == 0 and not p.stderr.strip(), f"completion of {line!r}: {p.stderr}")
        return set(p.stdout.split())
    expect({"migrate", "materialize"} <= complete("casmig", "m"), "commands")
    expect("--time-budget" in complete("casmig", "migrate", "--ti"), "migrate's options")
    expect({"hardlink", "reflink", "copy"} == complete("casmig", "materialize", "--link", "''"), "--link values")
    expect({"pkg00", "pkg01"} <= complete("casmig", "verify", "pkg"), "package ids")


if __name__ == "__main__":
    sys.exit(harness.main("e2e-install"))
