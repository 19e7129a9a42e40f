"""The import graph of first-party packages, read from source with ``ast``.

Every ``import`` and ``from ... import`` counts, wherever it stands (module level, inside a
function, under ``if TYPE_CHECKING:``): a cycle hidden in a function body is still a cycle.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
The implicit import of a parent package (``pkg/__init__.py``) is not an edge: a package that
re-exports its submodules would otherwise always form a cycle with them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImportSite:
    """One imported name: ``module`` (importer) imports ``target`` (and maybe ``name`` of it)."""

    module: str
    line: int
    target: str  # the module the statement imports from (resolved to a real module if ours)
    name: str | None = None  # the name taken from it (``from target import name``)


@dataclass
class ImportGraph:
    """Modules of ``packages`` under ``root`` and what each imports."""

    root: Path
    packages: tuple[str, ...]
    modules: dict[str, Path] = field(default_factory=dict)
    sites: list[ImportSite] = field(default_factory=list)
    attribute_uses: list[ImportSite] = field(default_factory=list)  # module._private access

    @classmethod
    def read(cls, root: Path, packages: Iterable[str]) -> ImportGraph:
        graph = cls(Path(root), tuple(packages))
        for package in graph.packages:
            for path in sorted((graph.root / package).rglob("*.py")):
                graph.modules[module_name(graph.root, path)] = path
        for name, path in graph.modules.items():
            graph._read_module(name, path)
        return graph

    def is_ours(self, module: str) -> bool:
        return module.split(".")[0] in self.packages

    def edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {name: set() for name in self.modules}
        for site in self.sites:
            if site.target in self.modules and site.target != site.module:
                out[site.module].add(site.target)
            elif site.target == site.module:
                out[site.module].add(site.target)  # a module importing itself
        return out

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module (or a self-import)."""
        return [sorted(c) for c in strongly_connected(self.edges()) if _is_cycle(c, self.edges())]

    def private_imports(self) -> list[ImportSite]:
        """``from ours import _name`` and ``ours._name`` across modules (dunders excepted)."""
        found = [
            s
            for s in self.sites
            if self.is_ours(s.target)
            and s.target != s.module
            and (_private(s.name) or any(_private(p) for p in s.target.split(".")))
        ]
        return found + [s for s in self.attribute_uses if s.target != s.module]

    def third_party_imports(self, package: str) -> Iterator[ImportSite]:
        """Imports made by ``package``'s modules of anything outside ``package``."""
        for site in self.sites:
            if site.module.split(".")[0] == package and site.target.split(".")[0] != package:
                yield site

    # ------------------------------------------------------------------ reading
    def _resolve(self, target: str, name: str | None) -> tuple[str, str | None]:
        if name is not None and f"{target}.{name}" in self.modules:
            return f"{target}.{name}", None
        return target, name

    def _read_module(self, module: str, path: Path) -> None:
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> our module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.sites.append(ImportSite(module, node.lineno, alias.name))
                    if self.is_ours(alias.name) and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.module, node.level)
                for alias in node.names:
                    target, name = self._resolve(base, alias.name)
                    self.sites.append(ImportSite(module, node.lineno, target, name))
                    if name is None and self.is_ours(target):
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                target = aliases[node.value.id]
                self.attribute_uses.append(ImportSite(module, node.lineno, target, node.attr))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on long chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _is_cycle(component: list[str], edges: dict[str, set[str]]) -> bool:
    return len(component) > 1 or component[0] in edges.get(component[0], set())


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def _absolute(module: str, is_package: bool, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)
