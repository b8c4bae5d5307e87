"""Check the package's import graph: no cycle (imports inside functions count), few function-local
imports of the package's own modules (each with a reason on its line), and no import of another
module's ``_private`` names.

import-linter (``lint-imports``, contracts in pyproject.toml) checks the layers; it does not see
imports inside functions, which is how cycles used to hide. Run: ``python scripts/check_imports.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "ckpt_tools"
MAX_LOCAL_IMPORTS = 10


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path) -> list[tuple[str, list[str], int, bool]]:
    """(imported module, names, line, inside a function) for each project import of a file."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                target = resolve(module, child, path.name == "__init__.py")
                if target.split(".")[0] == PACKAGE:
                    names = [a.name for a in child.names]
                    # "from . import x" imports the submodule x
                    subs = [f"{target}.{n}" for n in names if (root / Path(*f"{target}.{n}".split("."))).exists()
                            or (root / Path(*f"{target}.{n}".split("."))).with_suffix(".py").exists()]
                    for sub in subs:
                        found.append((sub, [], child.lineno, in_function))
                    if len(subs) < len(names):
                        found.append((target, [n for n in names if f"{target}.{n}" not in subs], child.lineno,
                                      in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append((alias.name, [], child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    local_imports: list[str] = []
    for name, path in modules.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, names, line, in_function in imports_of(path, root):
            target = target if target in modules else target.rsplit(".", 1)[0]
            if target != name and target in modules:
                graph[name].add(target)
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    problems.append(f"{path.relative_to(root)}:{line}: imports private name {imported} of {target}")
            if in_function:
                text = lines[line - 1]
                local_imports.append(f"{path.relative_to(root)}:{line}: {text.strip()}")
                if "#" not in text:
                    problems.append(f"{path.relative_to(root)}:{line}: a function-local import of {target} "
                                    "without a reason comment")
    if len(local_imports) > MAX_LOCAL_IMPORTS:
        problems.append(f"{len(local_imports)} function-local imports of the package's own modules "
                        f"(at most {MAX_LOCAL_IMPORTS})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    problems += [f"{name} is in no layer of the import-linter contract (pyproject.toml)"
                 for name in unlayered(modules, root)]
    for line in local_imports:
        print(f"local import: {line}")
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(modules)} modules, {sum(map(len, graph.values()))} imports, {len(local_imports)} function-local, "
          f"{len(problems)} problems")
    return 1 if problems else 0


def unlayered(modules: dict[str, Path], root: Path) -> list[str]:
    """Top-level modules and subpackages of the package that the layers contract does not name."""
    import tomllib

    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    named = {part.strip() for c in contracts if c["type"] == "layers" for layer in c["layers"]
             for part in layer.split("|")}
    tops = {".".join(m.split(".")[:2]) for m in modules if m.count(".") >= 1}
    return sorted(t for t in tops if t not in named and t.rsplit(".", 1)[1] not in ("__main__",))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


if __name__ == "__main__":
    sys.exit(main())
