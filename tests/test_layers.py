"""The import layers, read from the code: a core that knows nothing of training, Accelerate or the config,
under an application; no circles anywhere. Every import counts, also one inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "flows"
# the core: fields, paths, couplings, the divergence, ODE solves, log-density, sampling, preprocessing,
# the Flow and its safetensors file (README: layout)
CORE = {
    "flows",  # the package's __init__ is the application's front door; listed here only as a parent
    "flows.errors",
    "flows.nn",
    "flows.nn.registry",
    "flows.nn.embedding",
    "flows.nn.mlp",
    "flows.nn.trials",
    "flows.nn.potential",
    "flows.nn.unet",
    "flows.paths",
    "flows.coupling",
    "flows.divergence",
    "flows.ode",
    "flows.likelihood",
    "flows.sampling",
    "flows.preprocess",
    "flows.flow",
    "flows.distribution",
    "flows.files",
    "flows.mixture",
    "flows.context",
    "flows.flowfile",
    "flows.memory",
    "flows.dynamics",
    "flows.steppers",
    "flows.prior",
    "flows.calibration",
    "flows.augment",
    "flows.compiling",
}
FOREIGN_TO_CORE = {"accelerate", "yaml"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from flows import x`` counts as flows.x if that
    is a module), wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                sub = root / Path(*node.module.split("."), alias.name)
                if sub.with_suffix(".py").exists() or sub.is_dir():
                    found.add(f"{node.module}.{alias.name}")
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports; the edges from a package's modules to their own package's
    ``__init__`` (how a package re-exports) are left out."""
    modules = {module_name(p, root): p for p in (root / "flows").rglob("*.py")}
    return {
        name: {m for m in imports(path, root) if m in modules and not name.startswith(m + ".")} - {name}
        for name, path in modules.items()
    }


def find_circle(edges: dict[str, set[str]]) -> list[str]:
    """One circle of the graph (as a path that ends where it starts), or [] (a depth-first search)."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_the_core_imports_nothing_of_the_application_nor_accelerate_nor_yaml():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert CORE - {"flows"} <= set(modules), "a core module listed here no longer exists"
    wrong = []
    for name in CORE - {"flows"}:
        for imported in imports(modules[name]):
            top = imported.split(".")[0]
            if top in FOREIGN_TO_CORE or (top == "flows" and imported not in CORE):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_no_import_circles():
    circle = find_circle(graph())
    assert not circle, " -> ".join(circle)


def test_the_checks_see_a_circle_and_a_core_module_reaching_up(tmp_path):
    """The checks can fail: a core module that imports the config, and a circle, are found."""
    fake = tmp_path / "flows"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "ode.py").write_text("from flows.config import SolverConfig\n")
    (fake / "config.py").write_text("def f():\n    import flows.ode\n")
    edges = graph(tmp_path)
    assert edges["flows.ode"] == {"flows.config"} and edges["flows.config"] == {"flows.ode"}
    assert find_circle(edges) in (
        ["flows.config", "flows.ode", "flows.config"],
        ["flows.ode", "flows.config", "flows.ode"],
    )
    assert not find_circle({"a": {"b"}, "b": set()})


def test_importing_the_core_loads_neither_accelerate_nor_the_config():
    code = (
        "import sys, flows.flow, flows.flowfile, flows.nn, flows.ode, flows.likelihood, flows.sampling\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('accelerate', 'yaml') or m in "
        "('flows.config', 'flows.training', 'flows.api', 'flows.objectives')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_tests_a_kinds_name_but_the_one_that_registers_it():
    """Kinds by registry: a comparison with a field's, objective's or dataset's name only where it is defined."""
    from flows.data import DATASETS
    from flows.nn import FIELDS
    from flows.objectives import OBJECTIVES

    names = set(FIELDS) | set(OBJECTIVES) | set(DATASETS)
    own = {"flows/nn/mlp.py", "flows/nn/potential.py", "flows/nn/unet.py", "flows/objectives.py",
           "flows/data/toy2d.py", "flows/data/images.py", "flows/data/tables.py", "flows/data/suite.py"}  # fmt: skip
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if str(path.relative_to(ROOT)) in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for n in [node.left, *node.comparators] for c in ast.walk(n)
                             if isinstance(c, ast.Constant)]  # fmt: skip
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {v!r}" for v in constants if v in names]
    assert not found, found
