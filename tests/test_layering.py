"""ARCHITECTURE.md's import rules, held against the code (issue 26.5).

The document's table "Allowed imports" lists, for each folder, the folders it may import; this
test reads every ``import`` of the package (module level and inside functions alike, since an
import in a function is still a dependency), maps modules to folders through pyproject's
package-dir, and fails on an edge the table does not allow, and on any import cycle between
modules (an import inside a function closing a cycle counts: it only hides it)."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mods = {}
    for pkg, folder in cfg["tool"]["setuptools"]["package-dir"].items():
        for f in sorted((ROOT / folder).glob("*.py")):
            mods[pkg if f.name == "__init__.py" else f"{pkg}.{f.stem}"] = f
    return mods


def _imports(mods: dict[str, Path]) -> set[tuple[str, str]]:
    def resolve(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    edges = set()
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports are annotations, not dependencies
                continue
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    p = pkg
                    for _ in range(node.level - 1):
                        p = p.rpartition(".")[0]
                    base = p + ("." + base if base else "")
                # `from X import m`: the submodule X.m where m is one, else X itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base) for a in node.names]
            else:
                continue
            edges.update((name, r) for r in targets if r is not None and r != name)
    return edges


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _folder(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return str(rel) if rel.as_posix() == "conceptprune/cli.py" else f"{rel.parent.as_posix()}/"


def _allowed() -> dict[str, set[str]]:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## Allowed imports", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            table[m.group(1)] = set(re.findall(r"`([^`]+)`", m.group(2)))
    return table


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_folder_imports_are_the_documented_ones():
    mods = _modules()
    allowed = _allowed()
    folders = {_folder(p) for p in mods.values()}
    assert folders <= set(allowed), f"folders missing from ARCHITECTURE.md's table: {sorted(folders - set(allowed))}"
    seen = {}
    for a, b in _imports(mods):
        fa, fb = _folder(mods[a]), _folder(mods[b])
        if fa != fb:
            seen.setdefault((fa, fb), f"{a} imports {b}")
    bad = [f"{fa} -> {fb} ({why})" for (fa, fb), why in sorted(seen.items()) if fb not in allowed[fa]]
    assert not bad, "imports ARCHITECTURE.md does not allow:\n" + "\n".join(bad)
    print(f"{len(folders)} folders, {len(seen)} folder-level edges, all documented:")
    for (fa, fb), why in sorted(seen.items()):
        print(f"  {fa} -> {fb}   e.g. {why}")


def test_no_import_cycle_between_modules():
    cycles = _cycles(_imports(_modules()))
    assert not cycles, "module import cycles (an import inside a function still closes one): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports_and_cycles():
    # the checker itself: an import inside a function is an edge, and a two-module loop is a cycle
    tree = ast.parse("def f():\n    from .b import x\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    assert _is_type_checking(ast.parse("if TYPE_CHECKING:\n    import x\n").body[0])
    assert _cycles({("a", "b"), ("b", "a"), ("b", "c")}) == [["a", "b"]]
    assert _cycles({("a", "b"), ("b", "c")}) == []
