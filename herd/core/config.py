"""Config files: `get_config(arg=None) -> ml_collections.ConfigDict`, overridable.

An experiment is one python file with a `get_config(arg=None)` function. Entries load it
with absl + `ml_collections.config_flags` (`--config=path.py[:arg]`, `--config.key=value`);
library code and tests use `load_config(spec, overrides)`, which accepts the same strings.

    cfg = load_config("configs/lm/default.py", ["--config.train.steps=10"])

An override of a key the config does not have raises a ValueError naming the key, so a
typo never silently trains the wrong thing.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

__all__ = ["load_config", "apply_overrides", "config_path", "define_config_flag"]


def config_path(relative: str) -> str:
    """Absolute path of a config file shipped in the installed `configs` package.

    `config_path("lm/default.py")` works from any working directory.
    """
    import configs  # the top-level package installed alongside herd

    return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), relative)


def _split_spec(spec: str) -> tuple[str, str | None]:
    # 'path.py:arg' -> ('path.py', 'arg'); a Windows drive letter is not an issue on the
    # machines herd targets, but keep the split on the last ':' after the '.py'.
    if ".py:" in spec:
        path, arg = spec.split(".py:", 1)
        return path + ".py", arg
    return spec, None


def _load_file(path: str, arg: str | None) -> ml_collections.ConfigDict:
    if not os.path.exists(path):
        # Also accept paths relative to the installed configs package ('lm/default.py',
        # 'configs/lm/default.py') so the entry works outside the repository.
        for candidate in (config_path(path), config_path(path.removeprefix("configs/"))):
            if os.path.exists(candidate):
                path = candidate
                break
        else:
            raise ValueError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(
        "herd_config_" + os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg=None)")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(f"get_config() in {path!r} returned {type(cfg).__name__}, not ConfigDict")
    return cfg


def _parse_value(text: str, current: Any) -> Any:
    """Parses an override string into the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            value = float(text)  # '1e3' is a fine way to write an int
            if value != int(value):
                raise ValueError(f"expected an integer, got {text!r}") from None
            return int(value)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    # None, tuples, lists, dicts: a python literal, else the plain string.
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `a.b=value`) strings to `cfg` in place; returns it."""
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ValueError(f"override {item!r} is not of the form --config.key=value")
        key, value = text.split("=", 1)
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "the config"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ValueError(
                    f"unknown config key {key!r}: {where} has no field {part!r}"
                    + (f" (valid: {', '.join(valid)})" if valid else "")
                )
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        try:
            parsed = _parse_value(value, current)
        except ValueError as e:
            raise ValueError(f"bad value for config key {key!r}: {e}") from None
        with node.ignore_type():
            node[parts[-1]] = parsed
    return cfg


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` and applies `--config.key=value` overrides."""
    path, arg = _split_spec(spec)
    cfg = _load_file(path, arg)
    return apply_overrides(cfg, overrides)


def define_config_flag(default_relative: str, name: str = "config"):
    """Defines the absl `--config` flag (ml_collections.config_flags) once per process.

    `default_relative` is a path inside the installed `configs` package (e.g.
    'lm/default.py'); returns the flag holder, or the existing one if already defined.
    """
    from absl import flags
    from ml_collections import config_flags

    if name in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
    return config_flags.DEFINE_config_file(
        name,
        config_path(default_relative),
        "Experiment config file (path.py[:arg]).",
        lock_config=True,
    )


def run_entry(
    run_fn,
    default_config: str,
    default_workdir: str,
    workdir_help: str,
    argv: Sequence[str] | None = None,
) -> None:
    """The absl wiring every `python -m herd.X` entry shares.

    Defines `--config` (with `--config.k=v` overrides) and `--workdir`, refuses stray
    positional arguments, quiets absl's INFO logging (orbax logs every file it writes at
    INFO) and calls `run_fn(config, workdir)`.
    """
    import sys

    from absl import app, flags
    from absl import logging as absl_logging

    config_flag = define_config_flag(default_config)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", default_workdir, workdir_help)

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        absl_logging.set_verbosity(absl_logging.WARNING)
        run_fn(config_flag.value, flags.FLAGS.workdir)

    app.run(_main, argv=list(argv) if argv is not None else sys.argv)
