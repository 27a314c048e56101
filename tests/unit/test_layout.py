"""The engine's folders import only downwards, as docs/architecture.md's table says.

The table's `may import` column is the rule; this test reads it rather than repeating it, so the
document and the code cannot drift apart. It walks every import statement of every module
(including imports inside functions, which ``importlib`` strings in the CLI also count as).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import paths

REPO = paths.REPO
ENGINE = REPO / "engine" / "deliverd"
LAB = REPO / "engine" / "deliverd_lab"
ARCHITECTURE = REPO / "docs" / "architecture.md"
LONG_MODULE = 500
# Package-level names every module may use: the version string and the package docstring.
ROOT_MODULES = {"__init__", "__main__"}

_ROW = re.compile(r"^\| `(?P<unit>[a-z_]+)(?:/|\.py)` \|.*\| (?P<allowed>[^|]*) \|$")


def allowed_imports() -> dict[str, set[str]]:
    rules: dict[str, set[str]] = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line.strip())
        if match:
            rules[match["unit"]] = set(re.findall(r"`([a-z_]+)`", match["allowed"]))
    return rules


def unit_of(module: str) -> str | None:
    """The folder (or top-level module) a ``deliverd.x.y`` name belongs to."""
    parts = module.split(".")
    if parts[0] != "deliverd":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def is_engine_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (ENGINE / relative).with_suffix(".py").is_file() or (ENGINE / relative).is_dir()


def imported_modules(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "deliverd":  # from deliverd import daemon, __version__
                for alias in node.names:
                    name = f"deliverd.{alias.name}"
                    yield name if is_engine_module(name) else "deliverd"
            else:
                yield node.module
        elif (  # importlib.import_module("deliverd.cli.validate") and friends
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"deliverd(\.[a-z_]+)+", node.value)
            and is_engine_module(node.value)
        ):
            yield node.value


def engine_modules() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def test_table_names_every_folder_of_the_engine() -> None:
    rules = allowed_imports()
    folders = {p.name for p in ENGINE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    top_modules = {p.stem for p in ENGINE.glob("*.py")} - ROOT_MODULES
    assert folders | top_modules == set(rules), "docs/architecture.md's table and folders differ"


def test_allowed_directions_have_no_cycle() -> None:
    rules = allowed_imports()
    done: set[str] = set()

    def visit(unit: str, path: tuple[str, ...]) -> None:
        assert unit not in path, f"cycle in docs/architecture.md: {' -> '.join((*path, unit))}"
        if unit in done:
            return
        for lower in rules.get(unit, set()):
            visit(lower, (*path, unit))
        done.add(unit)

    for unit in rules:
        visit(unit, ())


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: str(p.relative_to(ENGINE)))
def test_module_imports_only_what_its_folder_may(path: Path) -> None:
    rules = allowed_imports()
    own = path.relative_to(ENGINE).parts[0].removesuffix(".py")
    wrong = []
    for module in imported_modules(path):
        assert not module.startswith("deliverd_lab"), f"{path.name} imports the test lab"
        unit = unit_of(module)
        if unit is None or unit == own or unit in ROOT_MODULES:
            continue
        if own in ROOT_MODULES:
            continue  # __main__ runs the CLI
        if unit not in rules.get(own, set()):
            wrong.append(module)
    assert not wrong, f"{own} may not import {sorted(set(wrong))} (docs/architecture.md)"


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE).with_suffix("").parts
    return ".".join(("deliverd", *parts)).removesuffix(".__init__")


def runtime_imports(path: Path) -> set[str]:
    """The engine modules a module imports when it runs, wherever the import statement is
    (imports under ``if TYPE_CHECKING:`` are for the type checker only and never run)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # from deliverd.cli import sendmail: the module itself
                name = f"{node.module}.{alias.name}"
                found.add(name if is_engine_module(name) else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name.startswith("deliverd.") and is_engine_module(name)}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules in import order, the first one again at the end),
    or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, set())):
            cycle = visit(imported, [*path, module])
            if cycle is not None:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle is not None:
            return cycle
    return None


def test_import_cycle_finds_a_circle_and_only_a_circle() -> None:
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"a"}}) == ["a", "a"]


@pytest.mark.parametrize("folder", sorted({p.parent for p in engine_modules()}),
                         ids=lambda p: str(p.relative_to(ENGINE)) or "deliverd")
def test_modules_of_a_folder_import_each_other_without_a_circle(folder: Path) -> None:
    """A circle between two modules of one stage means neither can be read, tested or
    imported alone; the piece both need belongs in a module of its own."""
    modules = {module_name(p): p for p in folder.glob("*.py")}
    graph = {name: runtime_imports(path) & set(modules) - {name}
             for name, path in modules.items()}
    cycle = import_cycle(graph)
    assert cycle is None, f"modules import each other in a circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: str(p.relative_to(ENGINE)))
def test_long_module_says_why_in_its_docstring(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if text.count("\n") <= LONG_MODULE:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "This module is long because" in docstring, (
        f"{path.relative_to(REPO)} has over {LONG_MODULE} lines: split it, or say why not"
    )


def test_no_name_prefix_does_a_folders_job() -> None:
    stems = [p.stem for p in ENGINE.rglob("*.py") if p.stem not in ROOT_MODULES]
    prefixes: dict[str, int] = {}
    for stem in stems:
        if "_" in stem:
            prefixes[stem.split("_")[0]] = prefixes.get(stem.split("_")[0], 0) + 1
    crowded = {prefix: n for prefix, n in prefixes.items() if n >= 3}
    assert not crowded, f"name prefixes shared by three or more modules: {crowded}"


def test_the_lab_is_not_inside_the_engine_package() -> None:
    assert not (ENGINE / "lab").exists()
    assert (LAB / "__init__.py").exists()
