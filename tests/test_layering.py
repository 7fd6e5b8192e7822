"""The house rules of the layout (docs/architecture.md), checked on the source.

* every module imports only modules on its floor or below (module-level and lazy imports);
* no module imports a private (``_name``) name of another gradstats module;
* there are no import cycles;
* ``gradstats.report`` reads logs with numpy/matplotlib only (no training-side modules).
"""
import ast
import os
from typing import Dict, List, Optional, Set, Tuple

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gradstats")

#: floors, bottom to top (docs/architecture.md); the longest matching prefix wins
FLOORS = {
    "gradstats.version": 0, "gradstats.core.cache": 0, "gradstats.core.layout": 0,
    "gradstats.core.reference": 0, "gradstats.core.running": 0,
    "gradstats.backends.base": 0, "gradstats._C": 0,
    "gradstats.backends": 1,
    "gradstats.core.grouping": 2.0, "gradstats.core.reduce": 2.1,
    "gradstats.core.traced": 2.1, "gradstats.core.stats": 2.2, "gradstats.core": 2.3,
    "gradstats.clip": 3, "gradstats.patch": 3.5,
    "gradstats.policies": 4,
    "gradstats.telemetry": 5,
    "gradstats.optim": 6, "gradstats.optim_extras": 6,
    "gradstats.report": 7,
    "gradstats.distributed": 8, "gradstats.noise_scale": 8, "gradstats.presets": 8,
    "gradstats.sweep": 8.5,
    "gradstats.integrations": 9, "gradstats.cli": 9, "gradstats.__main__": 9,
    "gradstats": 10,  # the package __init__: re-exports only
}
REPORT_ALLOWED = ("gradstats.report", "gradstats.telemetry.reader",
                  "gradstats.telemetry.format", "gradstats.core.running", "gradstats.version")


def _modules() -> Dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                if rel.endswith(".__init__"):
                    rel = rel[: -len(".__init__")]
                out[rel] = path
    return out


def _floor(mod: str) -> Optional[float]:
    best = None
    for prefix, fl in FLOORS.items():
        if mod == prefix or mod.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, fl)
    return None if best is None else best[1]


def _package(mod: str, is_pkg: bool) -> str:
    return mod if is_pkg else mod.rsplit(".", 1)[0]


def _imports(mod: str, path: str) -> List[Tuple[str, List[str], int, bool]]:
    """(imported module, imported names, line, at module level) of every import."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    out = []
    top = set(id(n) for n in tree.body)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(mod, is_pkg).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.append((target, names, node.lineno, id(node) in top))
    return out


def _resolve(target: str, names: List[str], mods: Dict[str, str]) -> List[Tuple[str, str]]:
    """(module, name) pairs: ``from pkg import submodule`` counts as importing the module."""
    res = []
    if not names:
        return [(target, "")]
    for n in names:
        if f"{target}.{n}" in mods:
            res.append((f"{target}.{n}", ""))
        else:
            res.append((target, n))
    return res


def test_floors_private_names_and_report_isolation():
    mods = _modules()
    problems = []
    for mod, path in sorted(mods.items()):
        src_floor = _floor(mod)
        assert src_floor is not None, f"{mod} has no floor in FLOORS (and in the docs)"
        for target, names, line, _ in _imports(mod, path):
            if not target.startswith("gradstats"):
                continue
            for tmod, name in _resolve(target, names, mods):
                if tmod == mod:
                    continue
                tf = _floor(tmod)
                same_pkg = tmod.rsplit(".", 1)[0] == mod.rsplit(".", 1)[0] or \
                    tmod.startswith(mod + ".") or mod.startswith(tmod + ".")
                if tf is not None and tf > src_floor and not same_pkg:
                    problems.append(f"{mod}:{line} imports {tmod} (floor {tf} > {src_floor})")
                if name.startswith("_") and not name.startswith("__") and \
                        f"{tmod}.{name}" != "gradstats._C":  # the compiled extension module
                    problems.append(f"{mod}:{line} imports private name {tmod}.{name}")
                if mod.startswith("gradstats.report") and not tmod.startswith(REPORT_ALLOWED):
                    problems.append(f"{mod}:{line} (report) imports {tmod}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _, top in _imports(mod, path):
            if not top or not target.startswith("gradstats"):
                continue
            for tmod, _ in _resolve(target, names, mods):
                while tmod not in mods and "." in tmod:
                    tmod = tmod.rsplit(".", 1)[0]
                if tmod in mods and tmod != mod and not mod.startswith(tmod + "."):
                    graph[mod].add(tmod)
    # a package's __init__ importing its own submodules is how packages work: not a cycle
    for mod in list(graph):
        graph[mod] = {t for t in graph[mod] if not t.startswith(mod + ".")}
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
