"""The package's structure, as a specification read from the source (`ast`; nothing is imported).

  imports   no cycle among the modules of `dsv3_jax` and `pallas_kernels` (function-level imports
            count), and none between the top-level modules and subpackages they collapse to;
  size      no function or method longer than 80 lines (STYLE.md: "functions under ~80 lines");
  import    importing the package or an entry point starts no JAX backend and touches no global
            logging state (checked in a fresh interpreter);
  forward   the model's forward pass has one definition (model.py), and the MTP module's input
            projection is called only by mtp.py and model.py.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsv3_jax", "pallas_kernels")
SCRIPTS = ("train.py", "infer.py")
MAX_FUNCTION_LINES = 80


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _module_files()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _ours(name: str | None) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None: a third-party name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _ancestors(name: str) -> list[str]:
    """dsv3_jax.train.step -> [dsv3_jax.train, dsv3_jax]: the packages Python imports before it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _imported(importer: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """Our modules that one import statement executes: the ones it names, and their parent
    packages (whose __init__ runs first), except the importer's own parents, which are already in
    sys.modules by the time it runs."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the importer's package, one level up per extra dot
            base = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module
        # `from pkg import name` imports the submodule pkg.name when there is one, else reads pkg
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    named = {m for m in map(_ours, names) if m is not None}
    parents = {p for m in named for p in _ancestors(m) if p in MODULES} - set(_ancestors(importer))
    return (named | parents) - {importer}


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports, at any depth of its body (functions included)."""
    return {name: set().union(*(_imported(name, node) for node in ast.walk(tree)
                                if isinstance(node, (ast.Import, ast.ImportFrom))))
            for name, tree in TREES.items()}


def collapse(name: str) -> str:
    """dsv3_jax.train.step -> dsv3_jax.train; dsv3_jax.model -> dsv3_jax.model; dsv3_jax -> dsv3_jax."""
    return ".".join(name.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each strongly connected component with more than one node
    (Tarjan's algorithm, then a shortest path back to the component's first node)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for comp in comps:
        start, members = comp[0], set(comp)
        paths, frontier = {start: [start]}, [start]
        while frontier and start not in {w for v in frontier for w in graph[v]}:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        found.append(paths[last] + [start])
    return found


# ---- imports ----------------------------------------------------------------------------------
def test_the_import_graph_sees_the_known_edges():
    """Guard against a resolver that silently finds nothing: edges every reader can check by eye."""
    graph = import_graph()
    assert "dsv3_jax.model" in graph["dsv3_jax"]  # from dsv3_jax.model import Transformer
    assert "dsv3_jax.train.layout" in graph["dsv3_jax.train.state"]  # from dsv3_jax.train import layout
    assert "pallas_kernels.fp8_matmul" in graph["pallas_kernels"]
    # importing dsv3_jax.infer.engine runs dsv3_jax/infer/__init__.py first
    assert {"dsv3_jax.infer", "dsv3_jax.infer.engine"} <= graph["dsv3_jax.train.main"]


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_cycle_between_top_level_modules_and_subpackages():
    collapsed: dict[str, set[str]] = {}
    for src, dsts in import_graph().items():
        unit = collapse(src)
        collapsed.setdefault(unit, set()).update(collapse(d) for d in dsts if collapse(d) != unit)
    found = cycles(collapsed)
    assert not found, "import cycles between subpackages:\n" + "\n".join(" -> ".join(c) for c in found)


# ---- size -------------------------------------------------------------------------------------
def _function_lengths():
    files = [*MODULES.values(), *(ROOT / s for s in SCRIPTS)]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # from the `def` line (decorators not counted) to the last line of the body
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_no_function_longer_than_80_lines():
    long = sorted(f"{where} ({n} lines)" for where, n in _function_lengths() if n > MAX_FUNCTION_LINES)
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


# ---- import-time side effects -----------------------------------------------------------------
_PROBE = """
import json, logging, sys
out = {}
for name in sys.argv[1:]:
    __import__(name)
    import jax._src.xla_bridge as xb
    log = logging.getLogger("asyncio")
    out[name] = {"backends": sorted(xb._backends), "asyncio_handlers": [repr(h) for h in log.handlers],
                 "asyncio_filters": [repr(f) for f in log.filters]}
print(json.dumps(out))
"""
ENTRY_MODULES = ("dsv3_jax", "dsv3_jax.train.main", "dsv3_jax.infer.main")


def test_importing_the_package_and_entry_points_has_no_global_side_effects():
    """A backend started at import fixes the device count and platform before a caller (conftest's
    8 fake devices, multihost's jax.distributed.initialize) can choose them; a handler or filter on
    the asyncio logger changes logging for the whole process of whoever imports us."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *ENTRY_MODULES], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # modules are imported in order into one interpreter: the first entry that is not clean is the culprit
    for name in ENTRY_MODULES:
        assert seen[name] == {"backends": [], "asyncio_handlers": [], "asyncio_filters": []}, (name, seen[name])


# ---- one forward ------------------------------------------------------------------------------
def _methods(tree: ast.Module):
    """(class name, method name) for every def directly in a class body."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, item.name


def test_the_model_forward_is_defined_once_in_model_py():
    # Methods only: a local closure named `forward` (the 1F1B schedule's per-tick step in
    # train/pipeline.py) runs the model's own pieces and is not a second definition of it.
    where = [(name, cls) for name, tree in TREES.items() if name.startswith("dsv3_jax")
             for cls, method in _methods(tree) if method == "forward"]
    assert where == [("dsv3_jax.model", "Transformer")], where


MTP_INPUT = {"eh_proj", "enorm", "hnorm"}


def test_only_mtp_and_model_touch_the_mtp_input_projection():
    """The MTP module's input (eq. 21) is built in MTPModule.__call__ and chained in
    Transformer.mtp_chain; a caller reaching for eh_proj/enorm/hnorm is composing a second copy."""
    offenders = [f"{MODULES[name].relative_to(ROOT)}:{node.lineno} .{node.attr}"
                 for name, tree in TREES.items() if name not in ("dsv3_jax.model", "dsv3_jax.mtp")
                 for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in MTP_INPUT]
    assert not offenders, offenders
