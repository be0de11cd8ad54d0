"""The package's import graph, read from the source: one way, no cycles.

Every `import` counts, at module level or inside a function: a lazy import that dodges a cycle
is still a cycle in the design. Modules sit in layers; a module may import its own layer and the
ones below it, never one above.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "gemma_jax"

# Lowest first. A module's layer is that of the longest prefix listed.
LAYERS = [
    ("base", ["gemma_jax.errors", "gemma_jax.logs", "gemma_jax.cli", "gemma_jax.paths", "gemma_jax.gguf_file",
              "gemma_jax.tokenizer", "gemma_jax.config_rules"]),
    ("model", ["gemma_jax.model"]),
    ("sharding", ["gemma_jax.sharding"]),
    ("weights, data, loss, config", ["gemma_jax.weights", "gemma_jax.data", "gemma_jax.loss", "gemma_jax.config"]),
    ("sampling", ["gemma_jax.sample"]),
    ("evaluation", ["gemma_jax.eval"]),
    ("training", ["gemma_jax.train"]),
    ("command lines", ["gemma_jax.train.__main__", "gemma_jax.evaluate", "gemma_jax.attention",
                       "gemma_jax.convert", "gemma_jax.memory", "gemma_jax.prepare", "gemma_jax.harness"]),
]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """gemma_jax modules `name` imports anywhere in its source. `from pkg import sub` names the
    submodule when one exists, else the package (whose __init__ then runs)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gemma_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemma_jax"):
            assert node.level == 0, f"{name}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    out.discard(name)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int:
    best, layer = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    return layer


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != "gemma_jax" and layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_imports_never_point_upwards():
    wrong = []
    for name, deps in GRAPH.items():
        if name == "gemma_jax":
            continue
        for dep in deps:
            if dep == "gemma_jax":
                wrong.append(f"{name} imports the top-level package (use the defining module)")
            elif layer_of(dep) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def find_cycle(graph):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(n):
        colour[n] = "grey"
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if colour.get(d) == "grey":
                return stack[stack.index(d):] + [d]
            if d not in colour:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        colour[n] = "black"
        return None

    for n in sorted(graph):
        if n not in colour:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_inits_only_reexport_their_own_modules():
    # Code imports a name from the submodule that defines it; an __init__ that pulled in other
    # packages would hide upward edges behind `from gemma_jax.x import name`.
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "gemma_jax":
            foreign = {d for d in GRAPH[name] if not d.startswith(name + ".")}
            assert not foreign, f"{name}/__init__.py imports {foreign}"


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", ["gemma_jax.data.readers", "gemma_jax.data.schema", "gemma_jax.data.packing",
                                  "gemma_jax.tokenizer"])
def test_host_side_data_modules_do_not_import_jax(name):
    # Data workers and tokenisation run in plain processes (grain workers, prepare): no jax there.
    tree = ast.parse(MODULES[name].read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in names if m.split(".")[0] in ("jax", "flax")}, name
