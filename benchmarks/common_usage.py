"""Which of the seven entry points (the six algorithm files and eval.py) use each top-level definition of common.py,
directly or through other definitions of common.py. tests/test_layout.py requires at least two for every one: what only
one file uses belongs in that file, and what only benchmarks or tests use belongs there.

    python benchmarks/common_usage.py          # every definition, with the entry points that use it
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("rs.py", "dpo.py", "kto.py", "dro.py", "dqo.py", "spo.py", "eval.py")


def _parse(name: str) -> ast.Module:
    with open(os.path.join(ROOT, name)) as f:
        return ast.parse(f.read(), name)


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def definitions() -> tuple[dict[str, set[str]], set[str]]:
    """(top-level name of common.py -> the top-level names its definition refers to, the names that module-level
    statements use when common is imported, e.g. an atexit registration)."""
    refs, at_import = {}, set()
    for node in _parse("common.py").body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            refs.setdefault(node.name, set()).update(_names(node))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and all(
                isinstance(t, ast.Name) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                refs.setdefault(t.id, set()).update(_names(node.value) if node.value else set())
        elif not isinstance(node, ast.Import | ast.ImportFrom):
            at_import |= _names(node)  # e.g. `PROMPT_TEMPLATES["arith"] = ...`, atexit.register(...)
    return {k: v & refs.keys() - {k} for k, v in refs.items()}, at_import & refs.keys()


def imported_names(name: str, seen: set | None = None) -> set[str]:
    """What an entry point takes from common: `from common import X` and `common.X`, itself or through the runtime/
    modules it imports (runtime.launch's `start` uses common's plan_steps for every algorithm file)."""
    out, seen = set(), seen if seen is not None else set()
    for node in ast.walk(_parse(name)):
        if isinstance(node, ast.ImportFrom) and node.module == "common":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "common":
            out.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runtime.") and node.module not in seen:
            seen.add(node.module)
            out |= imported_names(node.module.replace(".", "/") + ".py", seen)
    return out


def usage() -> dict[str, list[str]]:
    """Top-level name of common.py -> the entry points that reach it."""
    refs, at_import = definitions()
    used = {k: [] for k in refs}
    for entry in ENTRY_POINTS:
        seen, todo = set(), list(imported_names(entry) | at_import)
        while todo:
            n = todo.pop()
            if n in refs and n not in seen:
                seen.add(n)
                todo += refs[n]
        for n in seen:
            used[n].append(entry)
    return used


if __name__ == "__main__":
    for name, entries in sorted(usage().items(), key=lambda kv: (len(kv[1]), kv[0])):
        print(f"{len(entries)}  {name:<28} {' '.join(e[:-3] for e in entries)}")
