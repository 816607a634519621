"""Config files: `get_config(arg=None) -> ml_collections.ConfigDict`, overridable.

An experiment is one python file with a `get_config(arg=None)` function. Entries parse
`--config=path.py[:arg]` and `--config.key=value` with absl + `ml_collections.config_flags`;
`load_config(spec, overrides)` runs that same parser on a fresh absl FlagValues, so a test
and the command line cannot disagree about what an override means:

    cfg = load_config("configs/lm/default.py", ["--config.train.steps=10"])

A relative path is looked up in the working directory, then in the installed `configs`
package, so `--config=configs/lm/tiny.py` works from any directory. Every field of a
config file has a type (a value, a tuple, or `ml_collections.config_dict.placeholder(type)`
for "unset"); `--config.key=none` unsets a placeholder. An unknown key, a value of the
wrong type or a missing file is one ConfigError (a ValueError) naming the key and what
would be valid; an entry prints that sentence and exits with code 2.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

__all__ = [
    "ConfigError",
    "config_path",
    "define_config_flag",
    "load_config",
    "apply_overrides",
    "run_entry",
    "print_user_error",
    "exit_with_user_error",
]


class ConfigError(ValueError):
    """A bad config file, key or value, in one sentence that names it."""


class _CommandLineError(flags.Error):
    # Raised while absl parses: a flags.Error that is not a ValueError, so absl passes it
    # on unchanged (it rewraps ValueErrors as "flag --x=y: ...") and absl's own flag errors
    # and ours reach the entry's handler as one kind.
    pass


def config_path(relative: str) -> str:
    """Absolute path of a config file shipped in the installed `configs` package.

    `config_path("lm/default.py")` works from any working directory.
    """
    import configs  # the top-level package installed alongside herd

    return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), relative)


def _split_spec(spec: str) -> tuple[str, str | None]:
    # 'path.py:arg' -> ('path.py', 'arg'): split after '.py' so that the argument may
    # itself hold ':'.
    if ".py:" in spec:
        path, arg = spec.split(".py:", 1)
        return path + ".py", arg
    return spec, None


def resolve_config_file(path: str) -> str:
    """`path` if it exists, else the same path inside the installed `configs` package.

    Accepts 'configs/lm/tiny.py' and 'lm/tiny.py' from any working directory.
    """
    if os.path.exists(path):
        return path
    for candidate in (config_path(path), config_path(path.removeprefix("configs/"))):
        if not os.path.isabs(path) and os.path.exists(candidate):
            return candidate
    raise ConfigError(f"config file {path!r} does not exist")


def _load_file(path: str, arg: str | None) -> ml_collections.ConfigDict:
    path = resolve_config_file(path)
    spec = importlib.util.spec_from_file_location(
        "herd_config_" + os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() in {path!r} returned {type(cfg).__name__}, not a ConfigDict"
        )
    return cfg


# -- the absl flag ---------------------------------------------------------------------


class _DictParser(flags.ArgumentParser):
    """A python dict literal, for dict-typed placeholders (e.g. model.rope_scaling)."""

    def flag_type(self):
        return "dict"

    def parse(self, argument):
        try:
            value = ast.literal_eval(argument) if isinstance(argument, str) else argument
        except (SyntaxError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"{argument!r} is not a dict")
        return value


# ml_collections parses no dict-typed field by itself (a ConfigDict field takes a group of
# fields instead); a placeholder(dict) holds a value that is one dict as a whole.
config_flags.register_flag_parser_for_type(dict, _DictParser())

_TYPE_NAMES = {
    int: "an integer",
    float: "a float",
    bool: "a boolean (true/false)",
    str: "a string",
    tuple: "a tuple such as '(1, 2)'",
    dict: "a dict such as \"{'key': 1.0}\"",
}


def _is_placeholder(holder: ml_collections.ConfigDict, field: str) -> bool:
    # A typed placeholder is a FieldReference; ConfigDict.get_type reads `_fields` the
    # same way (get_ref would turn a plain field into a reference as a side effect).
    return isinstance(holder._fields.get(field), config_dict.FieldReference)


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises a _CommandLineError unless `key` ('a.b.c') names an overridable field."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if not isinstance(node, ml_collections.ConfigDict):
            raise _CommandLineError(
                f"config key {key!r}: {where} is {type(node).__name__}, not a group of fields"
            )
        if part not in node:
            valid = sorted(node.keys())
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _CommandLineError(
                f"unknown config key {key!r}: {where or 'the config'} has no field "
                f"{part!r}{hint}; valid fields: {', '.join(valid)}"
            )
        if i < len(parts) - 1:
            node = node[part]
    field_type = node.get_type(parts[-1])
    if field_type is type(None):
        raise _CommandLineError(
            f"config key {key!r} holds None without a type, so --config.{key} cannot be "
            "parsed: the config file should set it to "
            "ml_collections.config_dict.placeholder(<type>)"
        )
    if field_type is list:
        raise _CommandLineError(
            f"config key {key!r} holds a list, which --config.{key} cannot override: the "
            "config file should use a tuple"
        )


class _TypedOverrideParser(flags.ArgumentParser):
    """Wraps ml_collections' parser for one field: errors name the key and the type."""

    def __init__(self, inner, key: str, current: Any, field_type: type, nullable: bool):
        self.inner, self.key, self.current = inner, key, current
        self.field_type, self.nullable = field_type, nullable

    def flag_type(self):
        return self.inner.flag_type()

    def _expected(self) -> str:
        what = _TYPE_NAMES.get(self.field_type, self.field_type.__name__)
        element = self._element_type()
        if element is not None:
            what = f"a tuple of {element.__name__} such as '(1, 2)'"
        return what + (" or none" if self.nullable else "")

    def _element_type(self) -> type | None:
        # The type every element of the current tuple shares, if any: a new value must
        # keep it ((1000, 300) -> ints).
        if self.field_type is not tuple or not self.current:
            return None
        kinds = {type(v) for v in self.current}
        return kinds.pop() if len(kinds) == 1 and kinds <= {int, float, str, bool} else None

    def _fail(self, argument) -> _CommandLineError:
        return _CommandLineError(
            f"bad value {argument!r} for config key {self.key!r}: expected {self._expected()}"
        )

    def parse(self, argument):
        if not isinstance(argument, str):  # a default, already typed
            return self.inner.parse(argument)
        if self.nullable and argument.strip().lower() in ("none", "null"):
            return None
        try:
            value = self.inner.parse(argument)
        except (TypeError, ValueError, OverflowError):
            if self.field_type is int:  # '1e6' is a fine way to write a step count
                try:
                    number = float(argument)
                except ValueError:
                    raise self._fail(argument) from None
                if number.is_integer():
                    return int(number)
            raise self._fail(argument) from None
        element = self._element_type()
        if element is not None:
            for v in value:
                ok = isinstance(v, element) and not (element is int and isinstance(v, bool))
                if not (ok or (element is float and type(v) is int)):
                    raise self._fail(argument)
        return value


class _HerdConfigFlag(config_flags._ConfigFlag):
    """ml_collections' config-file flag with herd's file lookup and one-sentence errors.

    ml_collections does the parsing (the override flags, their parsers, the order checks);
    this adds the path lookup of `resolve_config_file`, checks every override's key before
    ml_collections looks it up (its own errors are a KeyError traceback or "type NoneType
    is not supported"), and wraps each override's parser so that a bad value names the
    key and the expected type.
    """

    def _initialize_missing_parent_fields(self, config, overrides):
        for key in overrides:
            _check_key(config, key)
        super()._initialize_missing_parent_fields(config, overrides)

    def _parse(self, argument):
        config = super()._parse(argument)
        for key in self._GetOverrides(self._GetArgv()):
            flag = self.flag_values[f"{self.name}.{key}"]
            if isinstance(flag.parser, _TypedOverrideParser):
                continue
            *path, field = key.split(".")
            holder = config
            for part in path:
                holder = holder[part]
            flag.parser = _TypedOverrideParser(
                flag.parser,
                key,
                holder[field],
                holder.get_type(field),
                _is_placeholder(holder, field),
            )
        return config


class _ConfigFileParser(flags.ArgumentParser):
    """`path.py[:arg]` -> the ConfigDict of its get_config(arg), locked if asked."""

    def __init__(self, lock_config: bool):
        self.lock_config = lock_config

    def flag_type(self):
        return "config object"

    def parse(self, argument):
        if isinstance(argument, ml_collections.ConfigDict):
            return argument
        try:
            cfg = _load_file(*_split_spec(argument))
        except ConfigError as e:
            raise _CommandLineError(str(e)) from None
        if self.lock_config:
            cfg.lock()  # a typo'd key raises rather than adding a field
        return cfg


def define_config_flag(
    default_relative: str | None = None,
    name: str = "config",
    *,
    flag_values: flags.FlagValues | None = None,
    sys_argv: Sequence[str] | None = None,
    lock_config: bool = True,
) -> flags.FlagHolder:
    """Defines the `--config` flag (with `--config.key=value` overrides) once per FlagValues.

    `default_relative` is a path inside the installed `configs` package (e.g.
    'lm/default.py'); `sys_argv` is the command line the overrides are read from (default
    sys.argv at parse time). Returns the flag holder, or the existing one if defined.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    if name in flag_values:
        return flags.FlagHolder(flag_values, flag_values[name])
    flag = _HerdConfigFlag(
        parser=_ConfigFileParser(lock_config),
        serializer=flags.ArgumentSerializer(),
        name=name,
        default=config_path(default_relative) if default_relative else None,
        help_string="Experiment config file (path.py[:arg]); override fields with "
        f"--{name}.key=value.",
        flag_values=flag_values,
        sys_argv=list(sys_argv) if sys_argv is not None else None,
    )
    return flags.DEFINE_flag(flag, flag_values)


def _as_override_flag(item: str) -> str:
    # '--config.a.b=1', 'config.a.b=1' and 'a.b=1' all mean the same override.
    text = item.removeprefix("--").removeprefix("config.")
    if "=" not in text:
        raise ConfigError(f"override {item!r} is not of the form --config.key=value")
    return "--config." + text


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` with `--config.key=value` overrides, as an entry would.

    Raises ConfigError naming the bad file, key or value. The result is unlocked (a test
    may add fields); entries get a locked one.
    """
    argv = ["herd", f"--config={spec}", *map(_as_override_flag, overrides)]
    flag_values = flags.FlagValues()
    holder = define_config_flag(None, flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    return holder.value.unlock()


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies `--config.key=value` strings to an in-memory `cfg` in place; returns it.

    The same absl parser as `load_config` and the entries: `cfg` is handed to it as the
    config a file would have returned.
    """
    argv = ["herd", "--config=<in memory>", *map(_as_override_flag, overrides)]
    flag_values = flags.FlagValues()
    flag = _HerdConfigFlag(
        parser=_InMemoryParser(cfg),
        serializer=flags.ArgumentSerializer(),
        name="config",
        default=None,
        help_string="config",
        flag_values=flag_values,
        sys_argv=argv,
    )
    flags.DEFINE_flag(flag, flag_values)
    try:
        flag_values(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    return cfg


class _InMemoryParser(flags.ArgumentParser):
    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg

    def flag_type(self):
        return "config object"

    def parse(self, argument):
        return self.cfg


# -- entries ---------------------------------------------------------------------------

# Errors a user causes with a config, a flag or an input path: an entry prints the
# sentence, not a traceback (`--verbose` shows it).
USER_ERRORS = (ValueError, OSError, flags.Error)


def print_user_error(error: BaseException) -> None:
    """Writes `error: <sentence>` to stderr: how every entry reports a user error."""
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        message = f"{type(error).__name__}: {message}"
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def exit_with_user_error(error: BaseException, code: int = 2) -> None:
    """print_user_error, then exit with `code`."""
    print_user_error(error)
    sys.exit(code)


def run_entry(
    run_fn,
    default_config: str,
    default_workdir: str,
    workdir_help: str,
    argv: Sequence[str] | None = None,
) -> None:
    """The absl wiring every `python -m herd.X` entry shares.

    Defines `--config` (with `--config.k=v` overrides), `--workdir`, `--verbose` and the
    multi-process flags of herd.core.distributed; refuses stray positional arguments;
    quiets absl's INFO logging (orbax logs every file it writes at INFO); starts
    jax.distributed when launched as several processes; calls `run_fn(config, workdir)`.
    A user error (bad config, flag or input: ValueError, OSError) prints "error: ..." to
    stderr and exits with code 2; `--verbose` shows the traceback instead.
    """
    from absl import app
    from absl import logging as absl_logging

    from herd.core import distributed

    argv = list(argv) if argv is not None else list(sys.argv)
    verbose_requested = any(a in ("--verbose", "--verbose=true") for a in argv)
    try:
        # Without --config on the command line, the default file is loaded (and the
        # overrides checked) right here, at definition.
        config_flag = define_config_flag(default_config, sys_argv=argv)
    except flags.Error as e:
        if verbose_requested:
            raise
        exit_with_user_error(e)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", default_workdir, workdir_help)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show the traceback of an error, not one line.")
    distributed.define_flags()

    def _parse_flags(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            if verbose_requested:
                raise
            exit_with_user_error(e)

    def _main(args):
        try:
            if len(args) > 1:
                raise ValueError(f"unexpected arguments {args[1:]} (flags are --name=value)")
            absl_logging.set_verbosity(absl_logging.WARNING)
            distributed.initialize_from_flags()
            run_fn(config_flag.value, flags.FLAGS.workdir)
        except USER_ERRORS as e:
            if flags.FLAGS.verbose:
                raise
            exit_with_user_error(e)

    app.run(_main, argv=argv, flags_parser=_parse_flags)
