"""Imports run one way (docs/architecture.md, "Layers"): every import in pipeline/ and actors/, those inside
functions included, goes to its own layer or a lower one, and no two sub-packages import each other, directly
or around a loop. Read from the source (ast), so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A sub-package is a package under pipeline/ (pipeline.driver) or a module beside them
# (pipeline.config); actors/ is one.
LAYERS = [
    (
        "core: base",
        {"pipeline.errors", "pipeline.batch", "pipeline.algorithm", "pipeline.storage", "pipeline.run_paths"},
    ),
    ("core: config", {"pipeline.config"}),  # names and types only: imports no implementation above the base
    ("core: implementations", {"pipeline.models", "pipeline.rewards", "pipeline.data", "pipeline.preflight"}),
    ("runtime", {"pipeline.runtime"}),
    ("actors", {"actors"}),
    ("driver", {"pipeline.driver", "pipeline.outputs", "pipeline.tune", "pipeline.rllib"}),
    ("entry points", {"pipeline.cli", "pipeline.evaluate", "pipeline.cluster_check"}),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """The sub-package a dotted module name belongs to (None: outside pipeline/ and actors/)."""
    parts = module.split(".")
    if parts[0] == "actors":
        return "actors"
    if parts[0] == "pipeline" and len(parts) > 1:
        return f"pipeline.{parts[1]}"
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, at any depth; `from pipeline import storage` names
    pipeline.storage, and a relative import is resolved against the file's package."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base in ("pipeline", "actors"):  # `from pipeline import storage`: the names are modules
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, where) for every import between two different sub-packages."""
    found = []
    for top in ("pipeline", "actors"):
        for path in sorted((ROOT / top).rglob("*.py")):
            source = unit_of(module_name(path))
            for line, module in imported_modules(path):
                target = unit_of(module)
                if source and target and target != source:
                    found.append((source, target, f"{path.relative_to(ROOT)}:{line} imports {module}"))
    return found


def test_every_sub_package_has_a_layer():
    units = {unit_of(module_name(p)) for top in ("pipeline", "actors") for p in (ROOT / top).rglob("*.py")}
    assert sorted(units - set(RANK) - {None}) == []


def test_imports_go_to_the_same_layer_or_below():
    upward = [where for source, target, where in edges() if RANK.get(target, -1) > RANK.get(source, -1)]
    assert upward == [], "imports that go up a layer:\n" + "\n".join(upward)


def test_no_two_sub_packages_import_each_other_directly_or_around_a_loop():
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges():
        graph.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            unit = todo.pop()
            if unit == goal:
                return True
            if unit not in seen:
                seen.add(unit)
                todo += graph.get(unit, ())
        return False

    loops = sorted(f"{s} -> {t} -> ... -> {s} ({w})" for s, t, w in edges() if reaches(t, s))
    assert loops == [], "imports that close a loop between sub-packages:\n" + "\n".join(loops)
