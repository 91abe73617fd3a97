"""The package's shape: imports run one way (no cycles), and torch is never imported.

Every import statement in nanogpt_np counts, at module level or inside a function
(a lazy import is still a dependency a reader has to follow)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanogpt_np"


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name):
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def exists(name):
    return is_package(name) or (PACKAGE.parent / (name.replace(".", "/") + ".py")).exists()


def imports_of(path):
    """(package modules imported, top-level names of outside modules imported)."""
    name = module_name(path)
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nanogpt_np"):
                    inside.add(alias.name)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").startswith("nanogpt_np"):
                target = node.module
            else:
                outside.add(node.module.split(".")[0])
                continue
            for alias in node.names:  # `from . import x` imports the module x
                sub = f"{target}.{alias.name}"
                inside.add(sub if exists(sub) else target)
    inside.discard(name)
    return inside, outside


def graph():
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(edges):
    """A list of modules forming a cycle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    edges = {m: inside for m, (inside, _) in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_lazy_and_relative_imports():
    g = graph()
    assert "nanogpt_np.kernels" in g["nanogpt_np.ops"][0]  # inside a function
    assert "nanogpt_np.layers.linear" in g["nanogpt_np.kernels"][0]  # from ..layers import linear
    assert "nanogpt_np.backend" in g["nanogpt_np.layers.attention"][0]
    assert "numpy" in g["nanogpt_np.backend"][1]


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_never_imports_torch():
    offenders = {m: outside & {"torch", "torchvision"} for m, (_, outside) in graph().items()}
    assert not {m: o for m, o in offenders.items() if o}


def test_backend_is_a_leaf_and_layers_know_nothing_above_them():
    g = graph()
    assert g["nanogpt_np.backend"][0] == set()
    for module, (inside, _) in g.items():
        if module.startswith("nanogpt_np.layers"):
            above = {m for m in inside if not m.startswith(("nanogpt_np.layers", "nanogpt_np.backend",
                                                            "nanogpt_np.cpu"))}
            assert not above, f"{module} imports {above}"
    assert "nanogpt_np.pretrained" not in g["nanogpt_np.model"][0]  # pretrained builds on model, not back
    assert "nanogpt_np.model" in g["nanogpt_np.pretrained"][0]
