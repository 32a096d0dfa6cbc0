"""The architecture, checked: the import graph of summarizer/ has no circles, and every import goes
down the floors below (the pipeline on top, stages under it, shared equipment at the bottom). A
new module is placed on a floor here; an import that would run back up fails this test.

Imports inside functions count (a lazy import is still a dependency); `if TYPE_CHECKING:` blocks
do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "summarizer"

# node (a top-level module, or a subpackage as a whole) -> floor. An import from one node to
# another must go to a lower floor.
FLOORS = {
    "__main__": 10,  # python -m summarizer: the Hydra entry point (it may launch torchrun)
    "cli": 9,  # predict, merge, baselines, the torchrun launcher
    "pipeline": 8,  # run(cfg): the job, top to bottom
    "train": 7,  # loss, trainer, checkpoints, callbacks, fit, resume
    "augment": 6,  # training-data augmentation
    "sweep": 6,  # the sweeper, its study and storage, the trial side, report, services
    "plan": 5,  # preflight: the run's frozen plan
    "generate": 5,
    "speed": 4,  # switches, CUDA-graph steps, packing, lean LoRA, static decoding, merge
    "model": 3,
    "mbr": 3,  # MBR's choice among sampled summaries (on metrics; generate takes it as a function)
    "prompt": 3,
    "data": 2,
    "metrics": 2,
    "tracking": 2,
    "distributed": 2,
    "config": 1,
    "compat": 1,
    "errors": 0,
    "files": 0,
    "lists": 0,
}


def _node(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The summarizer modules `name` imports (a `from pkg import mod` counts as pkg.mod)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative
            base = name.rsplit(".", node.level - (path.name == "__init__.py"))[0]
            mod = f"{base}.{node.module}" if node.module else base
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                found.add(t)
    # `from summarizer.x import f` also lists summarizer.x.f when x is a package with module f;
    # drop a package itself when one of its modules is named (the package is not a dependency)
    return {m for m in found if not any(o.startswith(m + ".") for o in found)}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_floor():
    nodes = {_node(m) for m in _graph()} - {"__init__"}
    assert nodes <= set(FLOORS), f"place these on a floor in FLOORS: {sorted(nodes - set(FLOORS))}"


def test_no_import_runs_up_or_sideways():
    bad = []
    for mod, deps in _graph().items():
        here = _node(mod)
        for dep in deps:
            there = _node(dep)
            if there != here and here != "__init__" and FLOORS[there] >= FLOORS[here]:
                bad.append(f"{mod} -> {dep} (floor {FLOORS[here]} -> {FLOORS[there]})")
    assert not bad, "imports that do not go down:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [mod, dep]))
            elif dep not in state:
                visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """The test above would catch what it claims: a function-level import of the pipeline from a
    stage is found (and one under TYPE_CHECKING is not)."""
    stage = tmp_path / "summarizer" / "data.py"
    stage.parent.mkdir()
    stage.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from summarizer import model\n"
        "def f():\n    from summarizer.pipeline import run\n"
    )
    known = {"summarizer.pipeline", "summarizer.model", "summarizer.data"}
    assert _imports("summarizer.data", stage, known) == {"summarizer.pipeline"}
