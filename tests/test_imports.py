"""The import graph (static, every `import` statement including the ones inside functions):
no cycle between modules, and data flows one way — lower layers never import higher ones."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "sdxl_jax"

# layer rules: a module under the key may not import anything under the listed prefixes
FORBIDDEN = {
    "sdxl_jax": ("data_tools",),  # the package never imports the top-level CLIs
    "sdxl_jax.diffusion": ("sdxl_jax.models", "sdxl_jax.data", "sdxl_jax.train", "sdxl_jax.sample",
                           "sdxl_jax.export", "sdxl_jax.tools", "sdxl_jax.runs"),
    "sdxl_jax.models": ("sdxl_jax.data", "sdxl_jax.train", "sdxl_jax.sample", "sdxl_jax.export",
                        "sdxl_jax.tools", "sdxl_jax.runs"),
    "sdxl_jax.data": ("sdxl_jax.train", "sdxl_jax.sample", "sdxl_jax.export", "sdxl_jax.tools",
                      "sdxl_jax.runs"),
    "sdxl_jax.config": ("sdxl_jax.train", "sdxl_jax.data", "sdxl_jax.models.build"),
    "sdxl_jax.checkpoint": ("sdxl_jax.train", "sdxl_jax.sample", "sdxl_jax.export"),
    "sdxl_jax.train": ("sdxl_jax.sample", "sdxl_jax.export", "sdxl_jax.tools"),
    "sdxl_jax.runs": ("sdxl_jax.train", "sdxl_jax.sample", "sdxl_jax.export", "sdxl_jax.tools"),
}


def _modules() -> dict:
    out = {}
    for base, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(base, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(base, f)
    return out


def _imports(name: str, path: str, modules: dict) -> set:
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m.split(".")[0] in (PACKAGE, "data_tools")}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) & set(modules) | {
        m for m in _imports(name, path, modules) if m.startswith("data_tools")}
        for name, path in modules.items()}


def test_no_upward_imports():
    bad = []
    for mod, deps in _graph().items():
        for layer, banned in FORBIDDEN.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [f"{mod} → {d}" for d in deps if any(d == b or d.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_graph_is_read():  # the checks above see real edges (not a vacuous empty graph)
    graph = _graph()
    assert "sdxl_jax.train.compile_ahead" in graph["sdxl_jax.train.loop"]
    assert "sdxl_jax.models.autoencoder" in graph["sdxl_jax.models.build"]
