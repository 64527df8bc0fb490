"""
The code's layout, checked:
- the root holds what a user runs plus the one model file; what the scripts share lives in the package smallgpt/;
- model.py imports nothing of the project (it is the file people copy); the package's modules sit in layers and
  import only lower ones; no module imports a script (only the benchmark tools import train.py, to time its very
  train_step) and there are no import circles;
- scripts in sub-folders find the package without path surgery (bench/ runs as `python -m bench.<name>`); the one
  exception is data/fineweb/prepare.py, which the docs run as a file;
- no function in the project is longer than a reader can follow without scrolling.
"""
import ast

from conftest import REPO

SCRIPTS = {"train", "sample", "serve", "eval", "export", "plot", "ablate", "condensation", "consolidate"}  # what a user runs
# each package module may import only modules of lower layers (the standard library and third-party packages aside);
# model.py, at the root, counts as layer 1: it imports torch only
LAYERS = [
    {"errors"},  # one-line user errors: standard library only
    {"flags", "shards", "sources", "tokens", "chat", "metrics", "monitor", "condensation", "evaluation", "device"},
    # the flag dialect / the token data directory / prepare.py's inputs / token windows / the chat format /
    # metrics.jsonl / watching a run / the condensation statistics / bits per byte and HellaSwag / device and precision
    {"config", "optim", "checkpoint", "tokenizer"},  # the training keys / the optimizer / checkpoint files (these
    # read model.py) / the tokenizer (of a data directory: reads shards.py)
    # what sample.py and serve.py share / the memory and time planner (reads optim's groups) / FSDP: sharding,
    # sharded checkpoints
    {"generation", "plan", "parallel"},
]
MAX_FUNCTION_LINES = 60
PATH_SURGERY_ALLOWED = {"data/fineweb/prepare.py", "data/chat/prepare.py"}  # documented as `python data/.../prepare.py`


def python_files():
    return sorted(p for p in REPO.rglob("*.py") if ".git" not in p.parts and "tests" not in p.parts)


def module_name(path):
    """'train', 'model', 'smallgpt.optim', 'bench.bench_train', 'data.fineweb.prepare'."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path):
    """The dotted names of the project's own modules that path imports (at any depth of the file)."""
    own = {module_name(p) for p in python_files()}
    package = module_name(path).rpartition(".")[0] if path.name != "__init__.py" else module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .errors import X: relative to this module's package
                base = ".".join(filter(None, [package, base]))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}  # from smallgpt import monitor
    return found & own


def test_the_root_holds_the_scripts_and_model_py():
    assert {p.stem for p in REPO.glob("*.py")} == SCRIPTS | {"model"}
    package = {p.stem for p in (REPO / "smallgpt").glob("*.py")} - {"__init__"}
    assert package == set().union(*LAYERS), "every module of smallgpt/ has a layer in this test"
    docstring = ast.get_docstring(ast.parse((REPO / "smallgpt/__init__.py").read_text()))
    for name in package:  # the package's docstring is its module map
        assert f"{name}.py" in docstring, f"smallgpt/__init__.py does not describe {name}.py"


def test_model_py_imports_nothing_of_the_project():
    assert project_imports(REPO / "model.py") == set()


def test_package_modules_import_only_lower_layers():
    layer_of = {f"smallgpt.{name}": i for i, layer in enumerate(LAYERS) for name in layer}
    layer_of["model"] = 1
    for name, layer in layer_of.items():
        if name == "model":
            continue
        for imported in project_imports(REPO / (name.replace(".", "/") + ".py")) - {"smallgpt"}:
            assert imported in layer_of, f"{name} imports {imported}, which is not a library module"
            assert layer_of[imported] < layer, f"{name} imports {imported}, which is not in a lower layer"


def test_no_module_imports_a_script():
    for path in python_files():
        if path.parent.name == "bench":  # the benchmarks time train.py's own train_step (and sample.py's settings)
            continue
        scripts = project_imports(path) & SCRIPTS
        assert not scripts, f"{path.relative_to(REPO)} imports the script(s) {', '.join(sorted(scripts))}"


def test_no_import_circles():
    graph = {module_name(p): project_imports(p) - {module_name(p)} for p in python_files()}
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(name):] + [name]))
        if name in done:
            return
        on_path.append(name)
        for imported in graph.get(name, ()):
            visit(imported)
        on_path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_scripts_in_folders_carry_no_path_surgery():
    for path in python_files():
        where = str(path.relative_to(REPO))
        if "sys.path" in path.read_text() and where not in PATH_SURGERY_ALLOWED:
            raise AssertionError(f"{where} changes sys.path: run it with python -m instead")


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions over 60 lines: " + ", ".join(too_long)
