"""The package layout as a contract: no import cycles, a host-free core, and the command lines users know.

Imports inside functions count: a lazy import that closes a loop is still a loop in the design.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib_consistency"
HOST_PACKAGES = {"modules", "backend", "gradio", "ldm", "sgm", "k_diffusion"}
METHODS = ("one_prompt_one_story", "story_diffusion", "story_sync", "oneactor")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not modules[target].name == "__init__.py":
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = counter[0]; counter[0] += 1
                    stack.append(target); on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop(); on_stack.discard(member); component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_only_hosts_imports_the_webui():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("lib_consistency.hosts"):
            continue
        for target in _imports(name, path):
            if target.split(".")[0] in HOST_PACKAGES:
                offenders.append(f"{name} imports {target}")
    assert offenders == []


def test_methods_do_not_reach_into_surfaces_or_hosts():
    """Each method is pure math plus its state; the surfaces call it, never the other way round."""
    def part(name: str) -> str:
        return (name.split(".") + [""])[1]

    core = METHODS + ("common", "story")
    offenders = [f"{name} -> {target}" for name, targets in _graph().items() if part(name) in core
                 for target in targets if part(target) in ("surfaces", "hosts", "bench", "evaluate")]
    assert offenders == []


@pytest.mark.parametrize("command, words", [
    ("lib_consistency.bench", ["--only", "storysync-unet"]),
    ("lib_consistency.evaluate", ["--out"]),
    ("lib_consistency.evaluate.consistory_plus", ["--url", "--preset"]),
    ("lib_consistency.benchmark", ["--url", "--preset"]),
])
def test_command_lines_users_know_still_answer(command, words):
    result = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(word in result.stdout for word in words), result.stdout
