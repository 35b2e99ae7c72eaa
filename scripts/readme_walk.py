"""Walk every command of README.md as a newcomer would, and say which one broke.

Every ```bash block is split into commands (backslash continuations joined, `&&` chains split)
and run in order in one scratch folder, so later commands see what earlier ones wrote (the
img2img example reads the PNG of the one before it); that folder starts as a copy of the checkout,
as a reader stands in a clone. Each must exit 0 and write the files its
flags name (--out, --animation, --save-steps, --json, --plot; an export's --out folder must hold
a manifest.json). ```python blocks run too, and must write what they `.save(...)`. A command
that ends in `&` (the server) starts in the background, serves the commands and blocks after it,
and is stopped (SIGTERM) when the walk ends; it fails the walk if it exits before.

Two modes:

  python scripts/readme_walk.py            # this environment's sdfast; install steps are
                                           # checked, not run: each extra they name exists in
                                           # pyproject.toml and its packages are installed
  python scripts/readme_walk.py --fresh    # copy the checkout, run every block literally in one
                                           # bash session: a brand-new .venv, the README's own
                                           # pip installs (needs PyPI or a local wheelhouse)

Commands that need a CUDA GPU, TensorRT or a model downloaded from the hub are not run; they
are matched by SKIP below, listed in the report, and the test (tests/test_readme_walk.py) pins
that list so a new README command cannot slip into it unnoticed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

#: substring of a command -> why the walk does not run it.
SKIP: dict[str, str] = {
    "./stable-diffusion-v1-5": "needs a Stable Diffusion folder downloaded from the hub",
    "bench/device_check.py": "needs a CUDA GPU (and TensorRT)",
    "python -m pytest": "the test suite itself: run on its own, not inside the walk",
    "--device cuda": "needs a CUDA GPU",
    "--backend tensorrt": "needs TensorRT and a CUDA GPU",
    "--format tensorrt": "needs TensorRT and a CUDA GPU",
}

#: --fresh leaves out the test section's install too, so the sections after it run with only the
#: quick start's install plus their own, as a reader who skipped the tests has.
SKIP_FRESH: dict[str, str] = {
    "pip install -e '.[dev]'": "--fresh: the tests' install, left out so later sections prove they need only theirs",
}

#: flags whose value is a file or folder the command must write.
OUTPUT_FLAGS = ("--out", "-o", "--animation", "--save-steps", "--json", "--plot")


@dataclasses.dataclass
class Block:
    lang: str  # "bash" | "python"
    code: str
    line: int  # 1-based line of the opening fence in README.md
    section: str = ""  # the "## " heading it sits under


@dataclasses.dataclass
class Step:
    text: str  # the command as it will run (bash) or the block's code (python)
    kind: str  # "run" | "install" | "skip" | "python"
    reason: str = ""
    section: str = ""
    outputs: tuple[str, ...] = ()
    status: str = "pending"  # "ok" | "failed" | "skipped" | "checked" (install verified) | "installed" (--fresh)
    seconds: float = 0.0
    detail: str = ""


def blocks(readme: str) -> list[Block]:
    """The ```bash and ```python blocks of a Markdown text, in order."""
    out = []
    for m in re.finditer(r"^```(bash|python)[ \t]*\n(.*?)^```", readme, flags=re.S | re.M):
        headings = re.findall(r"^## (.+)$", readme[:m.start()], flags=re.M)
        out.append(Block(m.group(1), m.group(2), readme.count("\n", 0, m.start()) + 1,
                         headings[-1].strip() if headings else ""))
    return out


def commands(block: Block) -> list[list[str]]:
    """A bash block's commands as argv lists: continuations joined, comments dropped, `&&` split."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    out: list[list[str]] = []
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        argv: list[str] = []
        toks = list(lex)
        if toks and toks[-1] == "&":  # a server started in the background: kept as argv's last word
            toks = toks[:-1]
            if "&&" in toks:
                raise ValueError(f"README line {block.line}: {line!r} backgrounds an && chain; start the server alone")
            if toks:
                out.append([*toks, "&"])
            continue
        for tok in toks:
            if tok == "&&":
                out.append(argv)
                argv = []
            elif tok in (";", "|", "||", "&", ">", "<"):
                raise ValueError(f"README line {block.line}: {line!r} uses {tok!r}; the walk runs plain && chains only")
            else:
                argv.append(tok)
        if argv:
            out.append(argv)
    return out


def output_paths(argv: list[str]) -> tuple[str, ...]:
    if argv[-1] == "&":
        return ()  # a server: it writes nothing, it answers the commands after it
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    if argv[:2] == ["sdfast", "generate"] and not {"--out", "-o"} & set(argv):
        outs.append("out.png")
    return tuple(outs)


def classify(argv: list[str]) -> tuple[str, str]:
    text = shlex.join(argv)
    for needle, why in SKIP.items():
        if needle in text:
            return "skip", why
    if argv[0] in (".", "source") or "venv" in argv[:3] or "pip" in argv[:3]:
        return "install", ""
    return "run", ""


def plan(readme: str) -> list[Step]:
    steps = []
    for b in blocks(readme):
        if b.lang == "python":
            saves = tuple(re.findall(r"\.save\(\s*[\"']([^\"']+)[\"']", b.code))
            steps.append(Step(b.code, "python", section=b.section, outputs=saves))
            continue
        for argv in commands(b):
            kind, why = classify(argv)
            text = shlex.join(argv[:-1]) + " &" if argv[-1] == "&" else shlex.join(argv)
            steps.append(Step(text, kind, why, b.section, output_paths(argv) if kind == "run" else ()))
    return steps


# -- install steps, checked against this environment -------------------------------------------

def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]


def check_install(argv: list[str], pyproject: dict) -> str:
    """'' when this environment already has what the install step would give, else what is missing."""
    if "pip" not in argv[:3] or "install" not in argv:
        return ""  # python -m venv / . .venv/bin/activate: nothing to check here
    extras_table = pyproject["project"].get("optional-dependencies", {})
    missing = []
    for arg in argv[argv.index("install") + 1:]:
        if arg.startswith("-"):
            continue
        m = re.fullmatch(r"\.(?:\[(.*)\])?", arg)
        if m:
            reqs = list(pyproject["project"]["dependencies"])
            for extra in filter(None, (m.group(1) or "").split(",")):
                if extra not in extras_table:
                    missing.append(f"extra [{extra}] is not in pyproject.toml")
                    continue
                reqs += extras_table[extra]
        else:
            reqs = [arg]
        for req in reqs:
            name = _requirement_name(req)
            try:
                have = md.version(name)
            except md.PackageNotFoundError:
                missing.append(f"{name} is not installed")
                continue
            pin = re.search(r"==\s*([\w.+-]+)", req)
            if pin and not have.split("+")[0] == pin.group(1).split("+")[0]:
                missing.append(f"{name} {have} installed, README pins {pin.group(1)}")
    return "; ".join(missing)


# -- running ------------------------------------------------------------------------------------

def _check_outputs(step: Step, cwd: Path, started: float) -> str:
    bad = []
    for rel in step.outputs:
        p = cwd / rel
        if not p.exists():
            bad.append(f"{rel} was not written")
        elif p.is_dir():
            if not any(p.iterdir()):
                bad.append(f"{rel}/ is empty")
            elif "export" in step.text.split()[:2] and not (p / "manifest.json").is_file():
                bad.append(f"{rel}/manifest.json missing")
        elif p.stat().st_mtime < started - 1:
            bad.append(f"{rel} is older than the command")
    return "; ".join(bad)


TOY_CAPTION = re.compile(r"a (\w+) (circle|square|triangle) on a (\w+) background")


def _check_drawing(step: Step, cwd: Path, python: Path | None = None) -> str:
    """A README example on the built-in toy model must draw what its caption says (issue 18.2)."""
    argv = shlex.split(step.text)
    def value(flag: str, default: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else default

    m = TOY_CAPTION.fullmatch(argv[2]) if argv[:2] == ["sdfast", "generate"] and len(argv) > 2 else None
    if not m or value("--model", "tiny") != "tiny":
        return ""
    png = value("--out", value("-o", "out.png"))
    if python is not None and not python.exists():
        return f"cannot grade the drawing: no {python} (did the quick start's venv move?)"
    if python is not None:  # --fresh: the walk's own interpreter may lack numpy and Pillow
        code = "import sys; from PIL import Image; from sdfast import toy; print(*toy.classify(Image.open(sys.argv[1])))"
        got = tuple(subprocess.run([str(python), "-c", code, str(cwd / png)], capture_output=True, text=True,
                                   check=True).stdout.split())
    else:
        sys.path.insert(0, str(ROOT))
        from PIL import Image

        from sdfast import toy

        got = toy.classify(Image.open(cwd / png))
    want = (m.group(1), m.group(3))
    return "" if got == want else f"draws {got[0]} on {got[1]}, the prompt says {want[0]} on {want[1]}"


def _run(step: Step, cmd: list[str], cwd: Path, env: dict, timeout: float) -> None:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout:.0f} s"
    step.seconds = time.time() - t0
    problem = f"exit {rc}: {tail}" if rc != 0 else _check_outputs(step, cwd, t0) or _check_drawing(step, cwd)
    step.status, step.detail = ("failed", problem) if problem else ("ok", "")


def _stop(servers: list[tuple[Step, subprocess.Popen, IO[str]]]) -> None:
    """Stop the background servers (SIGTERM: they drain and exit 0), then close their logs; one
    that died early fails."""
    for step, proc, log in servers:
        if proc.poll() is not None and step.status == "ok":
            step.status, step.detail = "failed", f"exited {proc.returncode} before the walk ended"
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def copy_checkout(dest: Path) -> None:
    """Copy the checkout's files (tracked and untracked, not ignored) into ``dest``: the README is
    read by someone standing in a clone, so its commands may name the repo's files
    (``sdfast/data/loras/...``)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def walk(readme: Path, workdir: Path, timeout: float = 1200) -> list[Step]:
    """Run README's commands with this environment's sdfast in ``workdir``, a copy of the checkout
    (see the module doc). A command ending in ``&`` (a server) starts in the background and runs
    until the walk ends."""
    copy_checkout(workdir)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = dict(os.environ, SDFAST_CACHE=str(workdir / ".sdfast-cache"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    steps = plan(readme.read_text(encoding="utf-8"))
    servers: list[tuple[Step, subprocess.Popen, IO[str]]] = []
    try:
        _walk_steps(steps, pyproject, workdir, env, timeout, servers)
    finally:
        _stop(servers)
    return steps


def _walk_steps(steps: list[Step], pyproject: dict, workdir: Path, env: dict, timeout: float,
                servers: list[tuple[Step, subprocess.Popen, IO[str]]]) -> None:
    for step in steps:
        if step.kind == "skip":
            step.status = "skipped"
        elif step.kind == "install":
            problem = check_install(shlex.split(step.text), pyproject)
            step.status, step.detail = ("failed", problem) if problem else ("checked", "")
        elif step.kind == "python":
            script = workdir / "readme_block.py"
            script.write_text(step.text, encoding="utf-8")
            _run(step, [sys.executable, str(script)], workdir, env, timeout)
        else:
            argv = shlex.split(step.text)
            if argv[0] == "python":
                argv[0] = sys.executable
            if argv[-1] == "&":
                log = open(workdir / f"background-{len(servers)}.log", "w")  # noqa: SIM115 (closed by _stop)
                servers.append((step, subprocess.Popen(argv[:-1], cwd=workdir, env=env, stdout=log,
                                                       stderr=subprocess.STDOUT), log))
                step.status = "ok"
                continue
            _run(step, argv, workdir, env, timeout)


def walk_fresh(readme: Path, workdir: Path, timeout: float = 3600) -> list[Step]:
    """Copy the checkout into ``workdir`` and run every block literally in one bash session."""
    repo = workdir / "sdfast"
    copy_checkout(repo)
    steps = plan(readme.read_text(encoding="utf-8"))
    lines = ["set -e"]
    for k, step in enumerate(steps):
        if step.text in SKIP_FRESH:
            step.kind, step.reason = "skip", SKIP_FRESH[step.text]
        if step.kind == "skip":
            step.status = "skipped"
            continue
        body = step.text if step.kind != "python" else f"python - <<'SDFAST_README_EOF'\n{step.text}SDFAST_README_EOF"
        lines += [f"echo \"@@step {k} $(date +%s.%N)\" >&2", body]
    lines.append('echo "@@step end $(date +%s.%N)" >&2')
    lines.insert(1, 'trap \'kill $(jobs -p) 2>/dev/null; wait\' EXIT')  # background servers end with the walk
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not os.environ.get("VIRTUAL_ENV") or not p.startswith(os.environ["VIRTUAL_ENV"]))
    env["SDFAST_CACHE"] = str(workdir / ".sdfast-cache")
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    marks = re.findall(r"^@@step (\d+|end) ([\d.]+)$", proc.stderr, flags=re.M)
    reached = [int(k) for k, _ in marks if k != "end"]
    last = reached[-1] if reached else -1
    times = [float(t) for _, t in marks]
    for i, k in enumerate(reached):
        if i + 1 < len(times):
            steps[k].seconds = times[i + 1] - times[i]
    for k, step in enumerate(steps):
        if step.status == "skipped":
            continue
        if k < last or (k == last and proc.returncode == 0):
            step.status = "ok" if step.kind != "install" else "installed"
            step.detail = _check_outputs(step, repo, t0) or _check_drawing(step, repo, repo / ".venv/bin/python") \
                if step.kind in ("run", "python") else ""
            if step.detail:
                step.status = "failed"
        elif k == last:
            step.status, step.detail = "failed", f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"
    return steps


def report(steps: list[Step]) -> str:
    rows = []
    for s in steps:
        head = s.text.splitlines()[0] if s.kind == "python" else s.text
        head = head if len(head) <= 100 else head[:97] + "..."
        why = s.reason or s.detail
        rows.append(f"{s.status:8} {s.seconds:6.1f}s  {head}" + (f"\n{'':17}{why}" if why else ""))
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--fresh", action="store_true", help="new .venv, README's installs run literally")
    ap.add_argument("--keep", type=Path, default=None, help="walk in this new or empty folder and keep it (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="readme-walk-") as tmp:
        workdir = args.keep or Path(tmp)
        if workdir.exists() and any(workdir.iterdir()):
            ap.error(f"--keep: {workdir} is not empty; the walk copies the checkout into it and would "
                     "overwrite what is there: name a new or empty folder")
        workdir.mkdir(parents=True, exist_ok=True)
        steps = (walk_fresh if args.fresh else walk)(args.readme, workdir)
    print(report(steps))
    failed = [s for s in steps if s.status == "failed"]
    print(f"\n{len(steps)} steps: {sum(s.status in ('ok', 'checked', 'installed') for s in steps)} passed, "
          f"{sum(s.status == 'skipped' for s in steps)} skipped, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
