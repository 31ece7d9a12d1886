"""dvc.yaml's stage dependencies hold every socseg source file the stage's command runs.

DVC reruns a stage only when one of its listed deps changes, so a source file missing from a
stage's deps is a change `dvc repro` silently ignores. The graph is derived here, at test time, from
the code itself: the stage's ``cmd`` names a ``socseg`` command; the command's function (and the
helpers of its module that it calls) import socseg modules, at module or function level; those
modules import others, and so on (whole modules from there on: DVC tracks files, not functions).
A failure prints the lines to add to, or remove from, dvc.yaml. A package ``__init__.py`` holding
nothing but its docstring is not required: it runs no code a stage could depend on.
"""

from __future__ import annotations

import ast
import inspect
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

from socseg.cli import main as socseg_main

PACKAGE = "socseg"

# Files a stage runs that are not listed as its deps, each with why (keep this set small).
NOT_STAGE_DEPS = {
    # The dispatcher: it imports every command module to register it and turns errors into one
    # line; what a stage computes starts at its command's function, where the walk starts.
    "src/socseg/cli.py",
}


@dataclass(frozen=True)
class SourceTree:
    """The package's source tree under ``src``: module names to files."""

    src: Path

    def file_of(self, module: str) -> Path | None:
        base = self.src.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def is_package(self, module: str) -> bool:
        return (self.src.joinpath(*module.split(".")) / "__init__.py").is_file()

    def relative(self, path: Path) -> str:
        return path.relative_to(self.src.parent).as_posix()


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` that runs (module or function level; not TYPE_CHECKING-only)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        elif not _is_type_checking_block(child):
            found.extend(import_nodes(child))
    return found


def imported_modules(tree: SourceTree, module: str, nodes: list[ast.Import | ast.ImportFrom]) -> set[str]:
    """The socseg modules ``nodes`` (statements of ``module``) load, packages on the way included."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: resolve against the importing module's package
            package = module if tree.is_package(module) else module.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names.add(base)
        # `from package import name`: name is a submodule when a file of that name exists
        names.update(f"{base}.{alias.name}" for alias in node.names if tree.file_of(f"{base}.{alias.name}"))
    with_parents = {".".join(name.split(".")[: i + 1]) for name in names for i in range(name.count(".") + 1)}
    return {name for name in with_parents if name.split(".")[0] == PACKAGE and tree.file_of(name)}


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def command_entry(tree: SourceTree, module: str, function: str) -> tuple[set[str], set[str]]:
    """The modules a command's module imports at module level plus those its function reaches.

    Only the command's own function and the module-level helpers it calls count, not the other
    commands of its module: ``commands/search.py`` holds four stage commands.
    """
    source_file = tree.file_of(module)
    assert source_file is not None, f"no source file for {module}"
    syntax = ast.parse(source_file.read_text())
    helpers: dict[str, ast.AST] = {}  # module-level names -> what defines them (e.g. an option's callback)
    for node in syntax.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            helpers[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            helpers.update({target.id: node for target in targets if isinstance(target, ast.Name)})
    assert function in helpers, f"{function} is not a module-level function of {source_file}"
    module_level = [node for node in syntax.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    nodes = list(module_level)
    pending, seen = [function], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        nodes.extend(import_nodes(helpers[name]))
        pending.extend(ref.id for ref in ast.walk(helpers[name]) if isinstance(ref, ast.Name) and ref.id in helpers)
    return imported_modules(tree, module, nodes), {module}


def source_dependencies(tree: SourceTree, module: str, function: str) -> set[str]:
    """Repository-relative paths of every socseg file a command runs (see NOT_STAGE_DEPS)."""
    pending, entry = command_entry(tree, module, function)
    pending |= {".".join(module.split(".")[: i + 1]) for i in range(module.count("."))}
    visited = set(entry)
    while pending:
        name = pending.pop()
        if name in visited:
            continue
        visited.add(name)
        path = tree.file_of(name)
        pending |= imported_modules(tree, name, import_nodes(ast.parse(path.read_text())))
    files = {tree.file_of(name) for name in visited}
    # a package __init__ holding only its docstring runs no code a stage could depend on
    files = {path for path in files if not (path.name == "__init__.py" and _only_docstring(path))}
    return {tree.relative(path) for path in files} - NOT_STAGE_DEPS


def resolve_command(cmd: str) -> click.Command:
    """The click command a stage's ``socseg ...`` command line runs."""
    words = shlex.split(cmd)
    if words[:3] == ["python", "-m", "socseg.cli"]:
        words = ["socseg", *words[3:]]
    if not words or words[0] != "socseg":
        raise AssertionError(f"stage command {cmd!r} does not run socseg: extend this test to derive its deps")
    command: click.Command = socseg_main
    for word in words[1:]:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        assert word in command.commands, f"{cmd!r}: {word!r} is not a sub-command of {command.name!r}"
        command = command.commands[word]
    assert not isinstance(command, click.Group), f"{cmd!r} names the group {command.name!r}, not a command"
    return command


def stage_commands(stage: dict) -> list[str]:
    cmd = stage["cmd"]
    return [cmd] if isinstance(cmd, str) else list(cmd)


def listed_files(stage: dict) -> list[str]:
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]
    return [dep.rstrip("/") for dep in deps if "${" not in dep]


def is_covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


@pytest.fixture(scope="module")
def stages(repo_root) -> dict[str, dict]:
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def derived(repo_root, stages) -> dict[str, set[str]]:
    """Each stage's source dependencies as the import graph has them."""
    tree = SourceTree(repo_root / "src")
    result: dict[str, set[str]] = {}
    for name, stage in stages.items():
        result[name] = set()
        for cmd in stage_commands(stage):
            callback = inspect.unwrap(resolve_command(cmd).callback)
            result[name] |= source_dependencies(tree, callback.__module__, callback.__name__)
    return result


def test_the_derived_graph_reaches_through_function_level_imports(derived):
    """The search command imports its training code inside the function; the walk must follow it."""
    assert {"src/socseg/training/search.py", "src/socseg/params.py", "src/socseg/data/tiling.py"} <= derived["search"]
    # the search command's module holds the other stages' commands too; their code is not search's
    assert "src/socseg/training/registry.py" not in derived["search"]
    assert "src/socseg/cli.py" not in derived["search"]


def test_each_stage_lists_every_source_file_it_imports(stages, derived):
    missing = {name: sorted(path for path in files if not is_covered(path, listed_files(stages[name])))
               for name, files in derived.items()}
    missing = {name: paths for name, paths in missing.items() if paths}
    message = "\n".join(f"stage {name!r} imports files dvc.yaml does not list; add under its deps:\n"
                        + "\n".join(f"      - {path}" for path in paths) for name, paths in missing.items())
    assert not missing, message


def test_each_listed_source_file_exists_and_is_imported(repo_root, stages, derived):
    """A renamed or no longer imported module leaves a dep that reruns a stage for nothing (or fails it)."""
    extra = {name: sorted(dep for dep in listed_files(stage) if dep.startswith(f"src/{PACKAGE}/")
                          and dep.endswith(".py") and dep not in derived[name])
             for name, stage in stages.items()}
    extra = {name: deps for name, deps in extra.items() if deps}
    message = "\n".join(f"stage {name!r} lists source files its command does not import; remove from its deps:\n"
                        + "\n".join(f"      - {dep}{'' if (repo_root / dep).exists() else '   (does not exist)'}"
                                    for dep in deps) for name, deps in extra.items())
    assert not extra, message
