"""Dependencies point inward: transport -> workflows -> core, never back, and no cycles.

The transport (the gRPC servicers in services/, reidal.grpc_server, reidal.serve, the web
page, the command line) may import the workflows and the core; the workflows and the core
never import the transport. Between packages (``reidal.X`` granularity) imports form no
cycle. Both are read from the source with :mod:`ast`, module-level imports and the ones
inside functions alike (a function-local import is still a dependency), so nothing has to
be imported or installed to check them, and a violation names its file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Source folders and the package each imports as (services/ imports as reidal.services,
#: see pyproject.toml). Generated code (reidal/v1) is left out: it imports only protobuf.
SOURCES: dict[str, Path] = {
    "reidal": ROOT / "reidal",
    "reidal.services": ROOT / "services",
    "reidal_client": ROOT / "clients" / "python" / "reidal_client",
    "reidal_wildbook": ROOT / "clients" / "wildbook" / "reidal_wildbook",
}
GENERATED = ("reidal.v1",)

#: The workflow modules, and the modules they stand on (store, errors, logs, limits,
#: metrics). They sit beside the transport modules at the top of reidal/ (grpc_server,
#: serve, cli, auth, tls...), so the layout cannot tell them apart: this list is where a
#: module is declared transport-free. A new workflow module is added here; the test
#: checks each one, with every module below it (``reidal.store`` covers the package).
WORKFLOWS: tuple[str, ...] = (
    "reidal.answer_state",
    "reidal.answers",
    "reidal.blobs",
    "reidal.collection_state",
    "reidal.cycle",
    "reidal.errors",
    "reidal.identities",
    "reidal.ingest",
    "reidal.limits",
    "reidal.logs",
    "reidal.metrics",
    "reidal.notify_pg",
    "reidal.runtime",
    "reidal.store",
    "reidal.stream_batches",
    "reidal.training_io",
    "reidal.training_jobs",
    "reidal.training_limits",
    "reidal.triton_supervisor",
    "reidal.vectors",
)
#: The core packages: algorithms, the model and its Triton plumbing, training, data.
CORE: tuple[str, ...] = ("reidal.core", "reidal.embedding", "reidal.training", "reidal.data")
#: What the core and the workflows must not import (each with everything below it).
TRANSPORT: tuple[str, ...] = (
    "grpc", "grpc_health", "grpc_reflection", "reidal.v1", "reidal.services",
    "reidal.grpc_server", "reidal.serve", "reidal.web", "reidal.cli", "reidal.cli_training",
)
#: The simulation helpers (synthetic embeddings, the simulated oracle, the loop on fixed
#: embeddings, dense references): for tests, experiments and the demo, never for serving.
SIMULATION: tuple[str, ...] = ("reidal.simulation",)
#: The modules that may import them, besides the package itself (and bench/, outside the
#: sources read here): the benchmark suite (`reidal bench`, `python -m
#: reidal.benchmark.train`) and the demo, whose annotator is simulated by design (`make
#: demo` answers from the synthetic set's identities). Every other module is production.
SIMULATION_USERS: tuple[str, ...] = ("reidal.benchmark", "reidal.demo")


@dataclass(frozen=True)
class Import:
    """One imported module, where it is imported, and whether inside a function."""

    module: str
    path: Path
    line: int
    local: bool


def under(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or a module below one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_files(sources: Mapping[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py file of the source folders."""
    out = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if not under(name, GENERATED):
                out[name] = path
    return out


def imports_of(name: str, path: Path, known: Iterable[str]) -> list[Import]:
    """Every import statement of the module ``name`` (at ``path``), resolved to module names
    (``from reidal import errors`` is reidal.errors when that module exists)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                        | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend(Import(a.name, path, child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, up level - 1 packages
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.append(Import(full if full in known else base, path, child.lineno,
                                      local))
            visit(child, inner)

    visit(tree, False)
    return out


def unit(module: str) -> str | None:
    """The package-level node of a module: ``reidal.X`` (reidal.core.aas -> reidal.core),
    or the client packages as wholes; None for third-party and generated modules."""
    parts = module.split(".")
    if parts[0] in ("reidal_client", "reidal_wildbook"):
        return parts[0]
    if parts[0] != "reidal" or under(module, GENERATED):
        return None
    return ".".join(parts[:2])


def import_graph(files: Mapping[str, Path]) -> dict[str, dict[str, Import]]:
    """Package-level graph: node -> {imported node: one import making the edge}."""
    graph: dict[str, dict[str, Import]] = {}
    for name, path in files.items():
        source = unit(name)
        if source is None:
            continue
        edges = graph.setdefault(source, {})
        for imp in imports_of(name, path, files):
            target = unit(imp.module)
            if target is not None and target != source:
                edges.setdefault(target, imp)
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as its nodes (first == last), or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)) is not None:
            return found
    return None


def transport_imports(files: Mapping[str, Path],
                      inner: Callable[[str], bool]) -> list[str]:
    """``file:line module imports transport`` for every module ``inner`` selects."""
    return [f"{imp.path.relative_to(ROOT) if imp.path.is_relative_to(ROOT) else imp.path}:"
            f"{imp.line} {name} imports {imp.module}"
            for name, path in files.items() if inner(name)
            for imp in imports_of(name, path, files) if under(imp.module, TRANSPORT)]


def simulation_imports(files: Mapping[str, Path]) -> list[str]:
    """``file:line module imports reidal.simulation...`` for every production module."""
    return [f"{imp.path.relative_to(ROOT) if imp.path.is_relative_to(ROOT) else imp.path}:"
            f"{imp.line} {name} imports {imp.module}"
            for name, path in files.items() if not under(name, SIMULATION + SIMULATION_USERS)
            for imp in imports_of(name, path, files) if under(imp.module, SIMULATION)]


def is_inner(name: str) -> bool:
    return under(name, CORE) or under(name, WORKFLOWS)


def cycle_report(graph: Mapping[str, Mapping[str, Import]]) -> str | None:
    """The first cycle with the import behind each edge, or None."""
    cycle = find_cycle(graph)
    if cycle is None:
        return None
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"  {graph[a][b].path}:{graph[a][b].line} imports {graph[a][b].module}"
        for a, b in zip(cycle, cycle[1:], strict=False))


# ---------------------------------------------------------------------------------- tests


def test_core_and_workflows_import_no_transport():
    files = module_files(SOURCES)
    assert all(any(under(m, [w]) for m in files) for w in WORKFLOWS), \
        "a WORKFLOWS entry names no module: keep the list current"
    assert transport_imports(files, is_inner) == []


def test_production_imports_no_simulation_helper():
    files = module_files(SOURCES)
    assert all(any(under(m, [p]) for m in files) for p in SIMULATION + SIMULATION_USERS), \
        "a SIMULATION / SIMULATION_USERS entry names no module: keep the lists current"
    assert simulation_imports(files) == []


def test_package_import_graph_has_no_cycle():
    report = cycle_report(import_graph(module_files(SOURCES)))
    assert report is None, report


def test_the_checks_catch_planted_violations(tmp_path):
    """A copy of the layout with a core module importing gRPC inside a function, a
    workflow importing a servicer, two packages importing each other, and a production
    module importing a simulation helper (inside a function) beside the benchmark doing so."""
    reidal, services = tmp_path / "reidal", tmp_path / "services"
    for folder in (reidal / "core", services):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    (reidal / "__init__.py").write_text("")
    (reidal / "core" / "algo.py").write_text("def f():\n    import grpc\n")
    (reidal / "runtime.py").write_text("from reidal.services import embedding\n")
    (services / "embedding.py").write_text("from reidal import runtime\n")
    (reidal / "a.py").write_text("from . import b\n")
    (reidal / "b.py").write_text("import reidal.a\n")
    (reidal / "training").mkdir()
    (reidal / "training" / "__init__.py").write_text("")
    (reidal / "training" / "launch.py").write_text(
        "def run():\n    from reidal.simulation.oracle import SimulatedOracle\n")
    (reidal / "benchmark.py").write_text("import reidal.simulation.oracle\n")
    files = module_files({"reidal": reidal, "reidal.services": services})
    assert simulation_imports(files) == [
        f"{reidal / 'training' / 'launch.py'}:2 reidal.training.launch imports "
        "reidal.simulation.oracle"]
    assert transport_imports(files, is_inner) == [
        f"{reidal / 'core' / 'algo.py'}:2 reidal.core.algo imports grpc",
        f"{reidal / 'runtime.py'}:1 reidal.runtime imports reidal.services.embedding"]
    report = cycle_report(import_graph(files))
    assert report is not None
    assert report.splitlines()[0] == "reidal.a -> reidal.b -> reidal.a"
    (reidal / "a.py").unlink()
    report = cycle_report(import_graph(module_files({"reidal": reidal,
                                                     "reidal.services": services})))
    assert report is not None
    assert report.splitlines()[0] == "reidal.runtime -> reidal.services -> reidal.runtime"


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"x": ["a"], "a": ["b", "c"], "b": [], "c": ["a"]}) == ["a", "c", "a"]
