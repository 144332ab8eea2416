"""The shape of the house: no import cycle among draftsmith's own modules, counting imports at any depth (a
function-level import hides a loop; it does not remove it), and no module with more than one job's length."""

from __future__ import annotations

import ast
from pathlib import Path

import draftsmith

PACKAGE = Path(draftsmith.__file__).resolve().parent


def module_imports() -> dict[str, set[str]]:
    """Each draftsmith module -> the draftsmith modules it imports anywhere in its body (`if TYPE_CHECKING:`
    blocks aside: they hold annotations' names, never run)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                edges |= {base} & modules.keys()
                edges |= {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_draftsmith_modules():
    assert cycles(module_imports()) == []


MAX_MODULE_LINES = 600


def test_no_module_holds_more_than_600_lines():
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these modules by job: {long}"


def test_the_cycle_finder_finds_a_cycle_at_any_depth():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"} - {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_one_train_verb_per_drafter_and_the_old_spellings_hidden():
    from typer.testing import CliRunner

    from draftsmith.cli.main import app

    runner = CliRunner()
    listing = runner.invoke(app, ["train", "--help"]).output
    assert all(verb in listing for verb in ("student", "heads", "router", "predictor", "bigram"))
    top = runner.invoke(app, ["--help"]).output
    assert "distill" not in top and "build-bigram" not in top
    for old, new in ((["distill"], ["train", "student"]), (["build-bigram"], ["train", "bigram"])):
        old_help, new_help = runner.invoke(app, [*old, "--help"]), runner.invoke(app, [*new, "--help"])
        assert old_help.exit_code == new_help.exit_code == 0 and "--out" in old_help.output
