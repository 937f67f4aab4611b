"""The module graph's rule (docs/ARCHITECTURE.md): imports only run downward, and never in a circle.

Layers, top to bottom:

    3  the command line and the jobs        gdiff.cli, gdiff.jobs
    2  the run engine and the compat edge   gdiff.engine, gdiff.compat (neither imports the other)
    1  the library                          models, diffusion, sampling, evaluation, data, train,
                                            checkpoints, factory
    0  the foundation                       errors, atomic, treediff, distributed, progress,
                                            workdir_lock, xla_options

Every import in gdiff/ (module top or inside a function) is read from the source; an import of a
higher layer, or a circle between gdiff's packages, fails with the offending file and import.
"""

import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Longest prefix wins; everything under gdiff not named here is the library.
LAYERS = {
    "gdiff": 1,
    "gdiff.cli": 3,
    "gdiff.jobs": 3,
    "gdiff.engine": 2,
    "gdiff.compat": 2,
    "gdiff.errors": 0,
    "gdiff.atomic": 0,
    "gdiff.treediff": 0,
    "gdiff.distributed": 0,
    "gdiff.progress": 0,
    "gdiff.workdir_lock": 0,
    "gdiff.xla_options": 0,
}
# Same-layer units that stand side by side: an adapter at the edge and the engine share nothing.
SIBLINGS = {("gdiff.engine", "gdiff.compat"), ("gdiff.compat", "gdiff.engine")}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every gdiff import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    )
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from gdiff.x import y` may import the module gdiff.x.y or a name of gdiff.x.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = _exists(candidate)
                found.append((node.lineno, candidate if is_module else base))
    return [(line, name) for line, name in found if name == "gdiff" or name.startswith("gdiff.")]


def _exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def unit(name: str) -> str:
    """The package or top-level module holding a module (gdiff.sampling.plan -> gdiff.sampling)."""
    return ".".join(name.split(".")[:2])


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(path): imports_of(path) for path in sorted((ROOT / "gdiff").rglob("*.py"))}


def violations(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Every import that runs up a layer or across the engine/compat line."""
    bad = []
    for source, imported in edges.items():
        for line, target in imported:
            up = layer(target) > layer(source)
            sideways = (unit(source), unit(target)) in SIBLINGS
            if up or sideways:
                bad.append(
                    f"{source}:{line} imports {target} "
                    f"(layer {layer(source)} -> {layer(target)}{', sideways' if sideways else ''})"
                )
    return bad


def package_cycle(edges: dict[str, list[tuple[int, str]]]) -> list[str] | None:
    """A circle between gdiff's packages (units), or None."""
    deps: dict[str, set[str]] = {}
    for source, imported in edges.items():
        deps.setdefault(unit(source), set()).update(
            unit(t) for _, t in imported if unit(t) != unit(source) and t != "gdiff"
        )
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def test_every_import_runs_downward():
    edges = graph()
    assert len(edges) > 50 and sum(map(len, edges.values())) > 150  # the parser found the graph
    assert violations(edges) == []


def test_no_circle_between_packages():
    assert package_cycle(graph()) is None


def test_the_rule_catches_an_upward_import_and_a_circle():
    edges = graph()
    edges["gdiff.sampling.plan"] = [*edges["gdiff.sampling.plan"], (1, "gdiff.jobs.sample")]
    edges["gdiff.engine.runs"] = [*edges["gdiff.engine.runs"], (2, "gdiff.compat.flags")]
    assert violations(edges) == [
        "gdiff.engine.runs:2 imports gdiff.compat.flags (layer 2 -> 2, sideways)",
        "gdiff.sampling.plan:1 imports gdiff.jobs.sample (layer 1 -> 3)",
    ]
    edges = graph()  # sampling imports models (through the factory): models -> sampling closes it
    edges["gdiff.models.unet"] = [*edges["gdiff.models.unet"], (3, "gdiff.sampling.grid")]
    cycle = package_cycle(edges)
    assert cycle is not None and {"gdiff.models", "gdiff.sampling"} <= set(cycle)


@pytest.mark.parametrize("name", ["gdiff.sampling.run", "gdiff.sampling.shards", "gdiff.pipeline"])
def test_moved_modules_are_gone(name):
    """One engine: the sampling run, its shards and the old pipeline package live elsewhere now."""
    assert not _exists(name)
