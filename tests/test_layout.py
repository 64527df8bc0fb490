"""
The code's layout, checked: library modules sit in layers and never import the scripts (no import circles),
and no function in the project is longer than a reader can follow without scrolling.
"""
import ast

from conftest import REPO

# each module may import only modules of lower layers (the standard library and third-party packages aside)
LAYERS = [
    {"errors"},  # one-line user errors: standard library only
    {"tokens", "model", "metrics", "monitor"},  # token files / the torch model / reading metrics.jsonl / watching a run
    {"config", "device", "optim"},
    {"checkpoint"},
    {"condensation", "generation"},  # the diagnostic train.py logs (and a script drawing its picture); the
    # generation code sample.py and serve.py share
    {"evaluation"},  # bits per byte and HellaSwag scoring, for train.py and eval.py
]
MAX_FUNCTION_LINES = 60


def python_files():
    return sorted(p for p in REPO.rglob("*.py") if ".git" not in p.parts and "tests" not in p.parts)


def project_imports(path):
    """Names of the repo's own root modules that path imports (at any depth of the file)."""
    own = {p.stem for p in REPO.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & own


def test_library_modules_import_only_lower_layers():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    for name, layer in layer_of.items():
        for imported in project_imports(REPO / f"{name}.py"):
            assert imported in layer_of, f"{name}.py imports the script {imported}.py"
            assert layer_of[imported] < layer, f"{name}.py imports {imported}.py, which is not in a lower layer"


def test_scripts_do_not_import_scripts():
    """A root module is either a library module (listed in LAYERS) or a script that no other script imports;
    only the benchmark tools import train.py, to time its very train_step."""
    scripts = {p.stem for p in REPO.glob("*.py")} - set().union(*LAYERS)
    for path in python_files():
        if path.parent.name != "bench":
            assert not project_imports(path) & scripts, f"{path.relative_to(REPO)} imports a script"


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions over 60 lines: " + ", ".join(too_long)
