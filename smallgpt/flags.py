"""
The one flag dialect of every script: a dataclass holds the keys, each with its one default and the comment that
--help shows; config files (Python assignments, as in nanoGPT) apply in order, then --key=value overrides. An
unknown key ("did you mean ...?") or a value of the wrong type is one ConfigError naming the key. A script whose
plain arguments are inputs rather than config files (prepare.py) names the list field that collects them.
Standard library only: prepare.py parses its flags without importing torch.
"""
import ast
import difflib
import inspect
import re
import types
from dataclasses import MISSING, fields

from .errors import ConfigError


def _optional(kind):
    """int for `int | None` (a key whose default is None, 'unset'); None for a plain type."""
    if isinstance(kind, types.UnionType) and type(None) in kind.__args__:
        return next(k for k in kind.__args__ if k is not type(None))
    return None


def _convert(key, value, kind, from_cli, auto_keys=()):
    """value (a Python value from a config file, or a string from the command line) as type kind (or 'auto' for
    auto_keys)."""
    if key in auto_keys and value == "auto":
        return value
    if _optional(kind) is not None:
        return None if value in (None, "None") else _convert(key, value, _optional(kind), from_cli)
    expected = kind.__name__ + (" or 'auto'" if key in auto_keys else "")
    if from_cli and kind is not str:
        text = value
        if kind is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key} expects {expected}, got {text!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{key} expects {expected}, got {value!r} ({type(value).__name__})")
    return value


def _set(values, known, key, value, where, from_cli=False, auto_keys=()):
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown key {key!r} in {where}{hint}")
    values[key] = _convert(key, value, known[key], from_cli, auto_keys)


def read_config_file(path):
    """The assignments of a Python config file, as a dict (imports and helper functions are ignored)."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text")
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # a user's file: report, don't crash
        raise ConfigError(f"{path} failed to run: {type(e).__name__}: {e}")
    except SystemExit as e:  # sys.exit() in a config file would end the run silently, maybe with status 0
        raise ConfigError(f"{path} called sys.exit({e.code!r}) while being read")
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not inspect.ismodule(v) and not callable(v)}


def parse_args(cls, argv, positional=None, usage=None):
    """Build a cls (a dataclass) from argv: config file paths, then --key=value overrides (--key alone = True).
    positional: the name of a list field that collects the plain arguments instead (they are then not config
    files); usage: lines printed above the keys by --help. cls.AUTO_KEYS, where a class has it, maps a key that
    also takes the string 'auto' to the key scaled by the value 'auto' replaced (their product is kept)."""
    known = {f.name: f.type for f in fields(cls) if f.name != positional}
    auto_keys = getattr(cls, "AUTO_KEYS", {})
    values = {positional: []} if positional else {}
    replaced = {key: getattr(cls, key) for key in auto_keys}  # the value each 'auto' replaced
    for arg in argv:
        if arg in ("-h", "--help"):
            print((usage.strip() + "\n\n" if usage else "") + describe(cls, config_files=positional is None))
            raise SystemExit(0)
        if not arg.startswith("--"):
            if positional:
                values[positional].append(arg)
                continue
            assignments = [(key, value, arg, False) for key, value in read_config_file(arg).items()]
        else:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if known.get(key) is not bool:
                    raise ConfigError(f"--{key} needs a value: --{key}=...")
                value = "True"
            assignments = [(key, value, "the command line", True)]
        for key, value, where, from_cli in assignments:
            if key in auto_keys and values.get(key) != "auto":
                replaced[key] = values.get(key, replaced[key])
            _set(values, known, key, value, where, from_cli, auto_keys)
    for key, scaled in auto_keys.items():
        if values.get(key) == "auto":  # until resolved, each unit of the replaced value counts in the scaled key
            values[scaled] = replaced[key] * values.get(scaled, getattr(cls, scaled))
    if positional and not values[positional]:
        del values[positional]  # none given: the field's default
    try:
        config = cls(**values)
    except ValueError as e:  # checks in __post_init__
        raise ConfigError(str(e))
    return config


def describe(cls, config_files=True):
    """Every key with its default and the comment written beside it in the source."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+): [\w .|\[\]]+ = .*?  # (.*)", line)
            if m:
                comments[m.group(1)] = m.group(2)
    rows = [f"  {f'--{f.name}={f.default!r}':<40}  {comments.get(f.name, '')}" for f in fields(cls) if f.default is not MISSING]
    return f"keys ({'set in a config file or ' if config_files else ''}as --key=value):\n" + "\n".join(rows)
