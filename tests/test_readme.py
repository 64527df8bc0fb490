"""
The commands in README.md and docs/ work as written: each `python <script> ...` in a bash block names a script
that exists and arguments its parser accepts, and the README's CPU quick start runs end to end (on the shared
sample instead of the FineWeb shard: no hub here).
"""
import importlib.util
import re
import shlex

import pytest
from conftest import REPO, run_script

from smallgpt.config import load_train_config, parse_args

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def bash_commands(path):
    """Every command in the ```bash blocks of a markdown file: lines split at && and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&")]
    return commands


def python_invocations(command):
    """(script, args) of a `python script ...` or `torchrun ... script ...` command, else None."""
    if command.split()[0] not in ("python", "torchrun"):  # curl, pip, ...: not ours to parse
        return None
    words = shlex.split(command)
    if words[0] == "torchrun":
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[i], words[i + 1:]
    if words[0] == "python" and words[1].endswith(".py"):
        return words[1], words[2:]
    if words[:2] == ["python", "-m"] and words[2].startswith("bench."):  # the tools in bench/ run as modules
        return words[2].replace(".", "/") + ".py", words[3:]
    return None


def load_script(path):
    """A script that runs as a file (data/*/prepare.py), imported under another name: its main does not run."""
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3] + "_for_docs", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def check_arguments(script, args):
    """The script's own parser accepts args (nothing is run)."""
    if "--help" in args:
        return
    if script == "train.py":
        load_train_config([a if a.startswith("--") else str(REPO / a) for a in args])
    elif script == "sample.py":
        import sample
        sample.validate(parse_args(sample.SampleConfig, args))
    elif script == "data/fineweb/prepare.py":
        load_script("data/fineweb/prepare.py").parse_args(args)
    elif script == "data/chat/prepare.py":
        chat_prepare = load_script("data/chat/prepare.py")
        parse_args(chat_prepare.ChatPrepareConfig, args, positional="inputs")
    elif script == "plot.py":
        import plot
        plot.options(args)
    elif script == "eval.py":
        eval_script = importlib.import_module("eval")
        eval_script.validate(parse_args(eval_script.EvalConfig, args))
    elif script == "export.py":
        import export
        parse_args(export.ExportConfig, args)
    elif script == "ablate.py":
        import ablate
        ablate.parse_sweep(parse_args(ablate.AblateConfig, args))  # the base and every overlay exist
    elif script == "condensation.py":
        import condensation
        parse_args(condensation.PictureConfig, args)
    elif script == "bench/gpu_ablation.py":
        from bench import gpu_ablation
        gpu_ablation.check(parse_args(gpu_ablation.AblationConfig, args))  # variants, seeds, budget


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_commands_parse(doc, monkeypatch):
    monkeypatch.chdir(REPO)
    checked = 0
    for command in bash_commands(doc):
        invocation = python_invocations(command)
        if invocation is None or "{" in command:  # pip, shell loops, brace expansion
            continue
        script, args = invocation
        assert (REPO / script).is_file(), f"{doc.name}: {command}: no {script}"
        check_arguments(script, args)
        checked += 1
    if doc.name == "README.md":
        assert checked >= 8


def test_readme_plot_command_leaves_the_committed_picture_alone():
    """The quick start's plot command draws into the run's directory: a user following it must not overwrite
    docs/train_tiny.png, the picture committed with the README (docs/monitoring.md says how to replace it)."""
    commands = re.findall(r"`(python plot\.py [^`]*)`", (REPO / "README.md").read_text())
    assert commands and not [c for c in commands if "docs/" in c]
    for command in commands:
        check_arguments(*python_invocations(command))


@pytest.mark.slow
def test_readme_cpu_quick_start_runs(tmp_path, sample_parquet):
    """The CPU quick start's commands, in order, as written except: the input is the shared sample (the hub is
    unreachable), the outputs go to tmp_path, and training stops after 20 steps."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start \(CPU.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [python_invocations(c) for line in block.splitlines() for c in line.split("&&")
                if python_invocations(c.strip())]
    assert [script for script, _ in commands] == ["data/fineweb/prepare.py", "train.py", "sample.py"]
    paths = {"data/sample": str(tmp_path / "data"), "out/tiny": str(tmp_path / "out")}
    for script, args in commands:
        args = [re.sub(r"=(data/sample|out/tiny)$", lambda m: "=" + paths[m.group(1)], a) for a in args]
        if script == "data/fineweb/prepare.py":
            args = [str(sample_parquet), *args]
        elif script == "train.py":  # the config reads the data where the quick start's prepare.py wrote it
            assert load_train_config([str(REPO / a) for a in args]).data_dir == "data/sample"
            args += [f"--data_dir={paths['data/sample']}", f"--out_dir={paths['out/tiny']}", "--max_iters=20",
                     "--eval_interval=10"]
        result = run_script(script, *args)
    assert len(result.stdout.strip()) > 20 and "Traceback" not in result.stderr
