"""The layers of the code base (DESIGN.md, "Layers"), checked on the source with `ast`.

Imports run one way, from the top layer down: cli > experiments, jobs > pipeline > stages >
ml > images and conventions > foundations > growth; no circle; `growth` imports nothing of
rtjax and no Flax; no inference module reaches a training module; imports of the project's
own modules sit at module level except in the CLI (which keeps `--help` fast).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Layer of each module, by longest matching prefix (bottom = 0).
LAYERS = {
    "growth": 0,
    "rtjax": 1, "rtjax.errors": 1, "rtjax.provenance": 1, "rtjax.config": 1, "rtjax.plotting": 1,
    "rtjax.data": 1,
    "rtjax.labels": 2, "rtjax.io": 2, "rtjax.tensor_io": 2, "rtjax.atlas": 2, "rtjax.metrics": 2,
    "rtjax.ctv": 2, "rtjax.study": 2, "rtjax.dicom": 2, "rtjax.rtstruct": 2, "rtjax.report": 2,
    "rtjax.ml": 3,
    "rtjax.seg": 4, "rtjax.anatomy": 4, "rtjax.inverse": 4, "rtjax.fit": 4, "rtjax.simulate": 4,
    "rtjax.pipeline": 5,
    "rtjax.experiments": 6, "rtjax.jobs": 6,
    "rtjax.cli": 7,
}
NAMES = {0: "growth", 1: "foundations", 2: "images and conventions", 3: "ml", 4: "stages",
         5: "pipeline", 6: "experiments/jobs", 7: "cli"}
#: Training modules, and the inference entry points that must never reach them.
TRAINING = ("rtjax.seg.train", "rtjax.inverse.train", "rtjax.inverse.dataset", "rtjax.jobs")
INFERENCE = ("rtjax.seg.infer", "rtjax.inverse.predict", "rtjax.inverse.weights", "rtjax.fit",
             "rtjax.pipeline.case", "rtjax.pipeline.cohort")
#: The only modules that may import project modules inside functions.
LAZY_ALLOWED = ("rtjax.cli",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in ("rtjax", "growth") for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS (and to DESIGN's map)")
    return LAYERS[best]


def _resolve(name: str) -> str | None:
    """The project module an imported name refers to (a module, or its parent package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) of one file."""
    tree = ast.parse(path.read_text())
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            module = _resolve(target)
            if module is not None:
                found.append((module, node.lineno, id(node) in inside))
    return found


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_never_go_up_a_layer():
    bad = []
    for module, imports in GRAPH.items():
        for target, line, _ in imports:
            if _layer(target) > _layer(module):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} "
                           f"({NAMES[_layer(module)]}) imports {target} ({NAMES[_layer(target)]})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circle():
    edges = {m: {t for t, _, _ in imports if t != m} for m, imports in GRAPH.items()}
    # a package's __init__ re-exporting its submodules is not a circle with them
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_project_imports_are_at_module_level():
    lazy = [f"{MODULES[m].relative_to(ROOT)}:{line}: imports {t} inside a function"
            for m, imports in GRAPH.items() if m not in LAZY_ALLOWED
            for t, line, inside in imports if inside]
    assert not lazy, "function-local imports of project modules:\n" + "\n".join(lazy)


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for t, _, inside in GRAPH.get(m, ()):
            if not inside and t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_imports_training(module):
    reached = sorted(t for t in _closure(module) if t.startswith(TRAINING))
    assert not reached, f"{module} reaches training modules {reached}"


def test_growth_is_physics_only():
    assert all(not t.startswith("rtjax") for m, imports in GRAPH.items() if m.startswith("growth")
               for t, _, _ in imports)
    code = "import growth, growth.inverse, growth.fit, sys; assert 'flax' not in sys.modules, 'flax'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
