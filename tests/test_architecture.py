"""The seams the architecture promises, checked on the source itself.

- no import cycle between sdfast modules, counting function-local imports (``if TYPE_CHECKING``
  blocks are never executed and do not count);
- run time never imports build time: nothing under ``sdfast/engines/`` nor ``sdfast/runtime.py``
  imports ``sdfast.export``;
- the guided combine ``u + g·(t − u)`` is written once;
- every module stays under 500 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdfast"
MAX_LINES = 500


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """sdfast modules that ``name`` imports anywhere in its body (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed, no import at run time
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the deepest known module the target names (``from . import rules`` names sdfast.rules)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("sdfast"):
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(name, path, known) for name, path in mods.items()}
    # A module importing a name from its own ancestor package (``from .. import __version__``)
    # reads a package that is always initialized first; that edge is not a cycle hazard.
    return {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_scanner_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "sdfast.rules" in graph["sdfast.request"]  # ``from . import rules``
    assert "sdfast.engines.torch" in graph["sdfast.runtime"]  # imported inside ``load``
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_sdfast_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_run_time_never_imports_build_time():
    graph = import_graph()
    runtime_side = [m for m in graph if m.startswith("sdfast.engines") or m == "sdfast.runtime"]
    offenders = {m: sorted(i for i in graph[m] if i.startswith("sdfast.export")) for m in runtime_side}
    assert not {m: v for m, v in offenders.items() if v}


def test_the_guided_combine_is_written_once():
    pattern = re.compile(r"uncond\s*\+\s*[\w.\[\]]+\s*\*\s*\(\s*cond\s*-\s*uncond\s*\)")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line.split("#")[0])]
    assert hits == ["loop.py:" + hits[0].split(":")[1]] and len(hits) == 1, hits


def test_every_module_is_under_500_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_LINES}
    assert not long


#: a test of a component's *name* standing in for a fact about it (is it a VAE part, a text
#: encoder, which rows it has): those facts are ComponentSpec fields (components.py).
NAME_BRANCH = re.compile(r"""(\.startswith\(\s*["'](vae|text_encoder)|\bin\s+\(\s*["'](vae_decoder|vae_encoder|text_encoder)["']\s*,"""
                         r"""|name\s*==\s*["'](vae_decoder|vae_encoder|text_encoder|text_encoder_2|unet)["'])""")


def test_component_facts_are_read_from_the_spec_not_from_the_name():
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
            if p.name != "components.py"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if NAME_BRANCH.search(line.split("#")[0])]
    assert not hits, hits


def test_the_name_branch_rule_sees_the_forms_it_forbids():
    for line in ('if name.startswith("vae"):', "if part.startswith('text_encoder'):",
                 'if name in ("vae_decoder", "vae_encoder"):', 'elif spec.name == "unet":'):
        assert NAME_BRANCH.search(line), line
    for line in ('engines["unet"](**inputs)', 'if spec.is_vae:', 'for name in self.engines:'):
        assert not NAME_BRANCH.search(line), line


#: a test of a model family's *name* standing in for a fact about it (its text encoders, its size
#: conditioning, diffusers' pipeline for it): those facts are ``components.Family`` fields. Only
#: the family records (model/components.py) and the text classes (text.py) are keyed by family.
FAMILY_BRANCH = re.compile(r"""\bfamily\s*(==|!=)|(==|!=)\s*\w*\.?family\b|\bfamily\s+(not\s+)?in\s*[(\[{]"""
                           r"""|(==|!=)\s*["'](sd|sdxl)["']""")
FAMILY_FILES = {"components.py", "text.py"}


def test_family_facts_are_read_from_the_family_record_not_from_its_name():
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
            if p.name not in FAMILY_FILES
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if FAMILY_BRANCH.search(line.split("#")[0])]
    assert not hits, hits


def test_the_family_branch_rule_sees_the_forms_it_forbids():
    for line in ('if info.family == "sdxl":', "if self.family != 'sd':", 'x = a if family == "sdxl" else b',
                 'if info.family in ("sd", "sdxl"):', 'if kind == "sdxl":'):
        assert FAMILY_BRANCH.search(line), line
    for line in ('specs = FAMILIES[info.family].specs', 'cls = TEXT[info.family]', 'if fam.size_conditioning:',
                 'family = model_family(model_index)'):
        assert not FAMILY_BRANCH.search(line), line
