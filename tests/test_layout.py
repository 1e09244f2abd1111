"""The package tree is the pipeline: each subpackage imports only from those before it in `LAYERS` (the order
finetune/__init__.py and the README's layout table give), and the entry scripts sit on top. Read from the source
with `ast`, so a new upward import -- the start of a circle -- fails here, naming the file and the import."""

import ast
from pathlib import Path

import finetune

PACKAGE = Path(finetune.__file__).parent
LAYERS = ["gptq", "data", "config", "models", "gpu", "evaluation", "training", "release", "bench"]
ENTRY_SCRIPTS = {"train.py", "evaluate.py", "export.py", "publish.py", "describe.py", "sweep.py", "compare.py"}


def imported_subpackages(path: Path) -> set[str]:
    """The finetune subpackages a module imports, relative or absolute, at any depth of the file."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # ("finetune", "training")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            dotted = base + (node.module.split(".") if node.module else [])
            names = [dotted] if node.module else [dotted + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        found |= {parts[1] for parts in names if len(parts) > 1 and parts[0] == "finetune" and parts[1] in LAYERS}
    return found


def test_the_tree_is_the_layer_list():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py"}
    assert subpackages == set(LAYERS)
    assert modules == ENTRY_SCRIPTS  # no library module among the entry scripts
    for layer in LAYERS:
        assert ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())), f"{layer} says what it holds"


def test_imports_flow_one_way():
    upward = []
    for layer in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            upward += [f"{path.relative_to(PACKAGE)} imports finetune.{name}"
                       for name in sorted(imported_subpackages(path) - allowed)]
    assert upward == []


def test_library_modules_never_import_an_entry_script():
    entries = {name.removesuffix(".py") for name in ENTRY_SCRIPTS}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in {f"finetune.{e}" for e in entries}:
                offenders.append(f"{path.relative_to(PACKAGE)}: from {node.module}")
    assert offenders == []
