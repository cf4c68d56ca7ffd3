"""The package layers hold: every import (module-level or inside a function) goes down or
sideways, never up, and module-level imports form no cycle.

    ezsd_jax:  core < ops < models < data < engine (train, evaluate, segm_eval, lvis_eval,
               toy, detector_programs) < clip < ezsd < demo < predict, aot, stages, main
    isal_jax:  above ezsd_jax; its generic code imports only ezsd_jax.core, and only the
               detection task adapter may import the detector's layers (up to the engine)

The graph is read from the source with `ast`, so the test needs no imports of the packages.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ezsd_jax", "isal_jax")

EZSD_LAYERS = [
    ("core",),
    ("ops",),
    ("models",),
    ("data",),
    ("train", "evaluate", "segm_eval", "lvis_eval", "toy", "detector_programs"),
    ("clip",),
    ("ezsd",),
    ("demo",),
    ("predict", "stages", "main", "aot", ""),
]
ISAL_LAYER = len(EZSD_LAYERS)
# isal_jax modules that adapt the detector (they may import ezsd_jax up to the engine)
ISAL_DETECTION = ("isal_jax.tasks.detection", "isal_jax.detection_al", "isal_jax.aot_steps")
ENGINE = 4


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(mod: str) -> int:
    parts = mod.split(".")
    if parts[0] == "isal_jax":
        return ISAL_LAYER
    first = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(EZSD_LAYERS):
        if first in names:
            return i
    raise AssertionError(f"{mod}: not in any layer of tests/test_layers.py; add it there")


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list:
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module or ""
    if pkg.split(".")[0] not in PACKAGES:
        return []
    # `from pkg import name`: name may be a submodule
    out = []
    for a in node.names:
        sub = f"{pkg}.{a.name}"
        out.append(sub if sub in MODULES else pkg)
    return out


def _imports(path: pathlib.Path):
    """-> [(imported module, at module level?)]"""
    mod = module_name(path)
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    for n in tree.body:   # `if TYPE_CHECKING:` / try blocks at module level count as top
        if isinstance(n, (ast.If, ast.Try)):
            top.update(id(c) for c in ast.walk(n))
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name, id(n) in top) for a in n.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(n, ast.ImportFrom):
            out += [(m, id(n) in top) for m in _resolve(mod, path.name == "__init__.py", n)]
    return out


FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): _imports(p) for p in FILES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_upward_import():
    bad = []
    for mod, imports in GRAPH.items():
        for dep, _ in imports:
            if dep in (mod, "ezsd_jax", "isal_jax"):   # a package's __init__ is its own root
                continue
            if mod.startswith("isal_jax") and dep.startswith("ezsd_jax"):
                limit = ENGINE if mod.startswith(ISAL_DETECTION) else 0
                if layer(dep) > limit:
                    bad.append(f"{mod} -> {dep} (isal_jax may use ezsd_jax "
                               f"{'up to the engine' if limit else 'core only'} here)")
            elif layer(dep) > layer(mod):
                bad.append(f"{mod} (layer {layer(mod)}) -> {dep} (layer {layer(dep)})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_core_imports_only_core():
    bad = [f"{m} -> {d}" for m, imps in GRAPH.items() if m.startswith("ezsd_jax.core")
           for d, _ in imps if not d.startswith("ezsd_jax.core")]
    assert not bad, bad


def test_no_import_cycle():
    edges = {m: {d for d, top in imps if top and d in MODULES and d != m}
             for m, imps in GRAPH.items()}
    # a package imports its parent's __init__ implicitly: ignore edges into package roots
    edges = {m: {d for d in ds if d not in PACKAGES} for m, ds in edges.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):      # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"module-level import cycles: {cycles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reader finds a function-local upward import (a check that could fail)."""
    f = ROOT / "ezsd_jax" / "ops" / "boxes.py"
    src = "def f():\n    from ezsd_jax.predict import detector\n"
    p = tmp_path / "x.py"
    p.write_text(src)
    tree = ast.parse(src)
    node = tree.body[0].body[0]
    assert _resolve("ezsd_jax.ops.boxes", False, node) == ["ezsd_jax.predict.detector"]
    assert layer("ezsd_jax.predict.detector") > layer(module_name(f))
