"""The shape of the codebase (DESIGN.md, "Layout"): imports point one way, the ML library
stands alone, private names stay in their module, the formatter owns the layout, and every
module can be read in one sitting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.import_graph import ImportGraph

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion", "orchestrator")
MAX_MODULE_LINES = 500
# Only the experiment side may touch the cluster and the tracking server.
FORBIDDEN_IN_DIFFUSION = ("orchestrator", "ray", "mlflow")


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph.read(ROOT, PACKAGES)


def test_the_graph_sees_every_module(graph: ImportGraph) -> None:
    expected = {"diffusion.gaussian", "orchestrator.cli", "orchestrator.names"}
    assert expected <= set(graph.modules)
    assert len(graph.sites) > 100  # it read real imports, not an empty tree


def test_no_import_cycle(graph: ImportGraph) -> None:
    cycles = graph.cycles()
    assert not cycles, "import cycles (imports inside functions included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_diffusion_imports_no_orchestrator_ray_or_mlflow(graph: ImportGraph) -> None:
    bad = [
        f"{s.module}:{s.line} imports {s.target}"
        for s in graph.third_party_imports("diffusion")
        if s.target.split(".")[0] in FORBIDDEN_IN_DIFFUSION
    ]
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module(graph: ImportGraph) -> None:
    bad = [f"{s.module}:{s.line} uses {s.target}.{s.name}" for s in graph.private_imports()]
    assert not bad, "\n".join(bad)


def test_the_formatter_owns_the_layout() -> None:
    marker = "fmt: " + "skip"  # split so this file does not match its own search
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for top in (*PACKAGES, "tests", "benchmarks")
        for path in sorted((ROOT / top).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if marker in line
    ]
    assert not hits, "hand layout the formatter cannot touch:\n" + "\n".join(hits)


def test_modules_are_readable_in_one_sitting(graph: ImportGraph) -> None:
    long = {
        name: n
        for name, path in graph.modules.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


# ---------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import f\n",
            "pkg/a.py": "from pkg.b import g\n\ndef f():\n    return g()\n",
            "pkg/b.py": "def g():\n    from pkg import a\n    return a\n",
            "pkg/c.py": "import pkg.a\n",
        },
    )
    graph = ImportGraph.read(tmp_path, ["pkg"])
    assert graph.cycles() == [["pkg.a", "pkg.b"]]


def test_checker_finds_private_names_and_forbidden_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "_hidden = 1\n\ndef _helper():\n    return _hidden\n",
            "pkg/b.py": "from pkg.a import _helper\n",
            "pkg/c.py": "from pkg import a\n\nx = a._hidden\ny = a.__name__\n",
            "pkg/d.py": "import ray\nfrom mlflow import MlflowClient\n",
        },
    )
    graph = ImportGraph.read(tmp_path, ["pkg"])
    assert graph.cycles() == []
    found = sorted((s.module, s.name) for s in graph.private_imports())
    assert found == [("pkg.b", "_helper"), ("pkg.c", "_hidden")]
    outside = sorted(s.target for s in graph.third_party_imports("pkg"))
    assert outside == ["mlflow", "ray"]


def _tour_rows() -> list[str]:
    """The package paths of the README's tour table, in order."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^\| `((?:diffusion|orchestrator)/[^`]*)` \|", text, flags=re.M)


def test_the_readme_tour_is_a_layering(graph: ImportGraph) -> None:
    """The README says a module imports only modules listed above it in its tour."""
    rows = _tour_rows()
    assert len(rows) > 10

    def row_of(module: str) -> int | None:
        path = module.replace(".", "/")
        hits = [
            i
            for i, row in enumerate(rows)
            if path == row.rstrip("/").removesuffix(".py")
            or path.startswith(row.rstrip("/").removesuffix(".py") + "/")
        ]
        return hits[-1] if hits else None

    missing = sorted(m for m in graph.modules if row_of(m) is None and "." in m)
    assert not missing, f"modules the README tour does not place: {missing}"
    downward = [
        f"{module} ({rows[row_of(module)]}) imports {target} ({rows[row_of(target)]})"
        for module, targets in graph.edges().items()
        for target in targets
        if row_of(module) is not None
        and row_of(target) is not None
        and row_of(target) > row_of(module)
    ]
    assert not downward, "imports that point down the README tour:\n" + "\n".join(downward)
