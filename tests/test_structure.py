"""The layout is one way: every import inside ``vfmkit`` points to its own layer or a lower one, and no two
modules import each other round a cycle (function-local imports included).

Layers, highest first: ``cli.py`` + ``commands/`` > ``pipelines/`` > ``methods/`` > ``engine/``, ``models/``,
``eval/`` > ``data/``, ``text/``, ``config.py``. The package's own ``__init__.py`` and ``assets/`` are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vfmkit

PKG = Path(vfmkit.__file__).resolve().parent

LAYERS = {
    "cli": 5,
    "commands": 5,
    "pipelines": 4,
    "methods": 3,
    "engine": 2,
    "models": 2,
    "eval": 2,
    "data": 1,
    "text": 1,
    "config": 1,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) < 2:
        return None  # the package itself
    return LAYERS.get(parts[1])


def all_modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if rel.parts[0] == "assets" or rel == Path("__init__.py"):
            continue
        mods[module_name(p)] = p
    return mods


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names (``vfmkit.a.b.func`` -> ``vfmkit.a.b``)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


def imports_of(mod: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported vfmkit module) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - (node.level - 1)]
                src = ".".join(pkg + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            names = [f"{src}.{a.name}" for a in node.names] + [src]
        targets = {resolve(n, known) for n in names if n == "vfmkit" or n.startswith("vfmkit.")}
        out += [(node.lineno, t) for t in sorted(targets - {None, mod})]
    return out


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    known = all_modules()
    return known, {m: imports_of(m, p, known) for m, p in known.items()}


def upward_imports() -> list[str]:
    known, graph = _graph()
    bad = []
    for mod, edges in graph.items():
        lo = layer_of(mod)
        for line, target in edges:
            lt = layer_of(target)
            if lo is not None and lt is not None and lt > lo:
                bad.append(
                    f"{known[mod].relative_to(PKG.parent)}:{line}: {mod} imports higher-layer {target}"
                )
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    _, graph = _graph()
    adj = {m: sorted({t for _, t in edges}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            strong(v)
    return comps


def test_every_module_has_a_layer():
    """A new top-level folder must be placed in the layer table, not silently skipped."""
    unknown = sorted({m for m in all_modules() if layer_of(m) is None})
    assert not unknown, f"modules outside every layer: {unknown}"


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "imports that point to a higher layer:\n" + "\n".join(bad)


def test_models_hold_no_training_job():
    """A model file holds the model only: the training loop is reached through a registered method."""
    known, graph = _graph()
    bad = [
        f"{known[m].relative_to(PKG.parent)}:{line}: {m} imports {t}"
        for m, edges in graph.items()
        if m.startswith("vfmkit.models")
        for line, t in edges
        if t.startswith("vfmkit.engine")
    ]
    assert not bad, "model modules that import the engine:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "src,expect",
    [
        ("from vfmkit.commands.reinforce import parse_class_index\n", "vfmkit.commands.reinforce"),
        ("def f():\n    from vfmkit.engine import train\n", "vfmkit.engine"),
        ("from ..engine.trainer import train\n", "vfmkit.engine.trainer"),
        ("import vfmkit.methods.clip as c\n", "vfmkit.methods.clip"),
    ],
)
def test_checker_sees_imports(tmp_path, src, expect):
    """The parser finds absolute, relative and function-local imports (so the checks above can fail)."""
    known = all_modules()
    p = tmp_path / "x.py"
    p.write_text(src)
    targets = [t for _, t in imports_of("vfmkit.data.x", p, known)]
    assert expect in targets


def test_every_method_build_is_typed():
    """Every registered method's ``build(cfg: RunConfig, dist_info: DistInfo, ...) -> Job`` carries its types."""
    from vfmkit.methods.registry import METHODS

    untyped = []
    for name, mod in METHODS.items():
        path = PKG / Path(*mod.split(".")[1:]).with_suffix(".py")
        tree = ast.parse(path.read_text())
        build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
        args = build.args.args[:2]
        ann = [ast.unparse(a.annotation) if a.annotation is not None else None for a in args]
        ret = ast.unparse(build.returns) if build.returns is not None else None
        if ann != ["RunConfig", "DistInfo"] or ret != "Job":
            untyped.append(f"{name}: build({', '.join(map(str, ann))}) -> {ret}")
    assert not untyped, untyped
