"""Every field of every config file, overridden through the real absl command line.

Each config file is parsed in a subprocess by absl `app.run` with herd's `--config` flag
(the code path of every `python -m herd.X` entry), with every leaf set to a new value of
its type, placeholders included; the subprocess prints the parsed config as JSON.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_dict

from herd.core.config import config_path, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.relpath(p, config_path(""))
    for p in glob.glob(config_path("*/*.py"))
    if "def get_config" in open(p).read()  # common.py & co. are builders, not experiments
)

# The entry's flag wiring, without the entry: absl parses `--config=... --config.k=v`, then
# the config is printed. Records whether jax was imported (it must not be, by this code).
HARNESS = """
import json, sys
from absl import app
from herd.core.config import define_config_flag
CONFIG = define_config_flag("lm/tiny.py")
JAX_AT_START = "jax" in sys.modules
def main(argv):
    print(json.dumps(dict(config=CONFIG.value.to_dict(), jax_at_start=JAX_AT_START,
                          jax_at_end="jax" in sys.modules)))
app.run(main)
"""

ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _run_python(code, args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_harness(args, cwd=REPO):
    return _run_python(HARNESS, args, cwd)


def _leaves(cfg, prefix=""):
    """(key, holder, field) for every leaf of a ConfigDict."""
    for field in cfg.keys():
        key = prefix + field
        if isinstance(cfg[field], config_dict.ConfigDict):
            yield from _leaves(cfg[field], key + ".")
        else:
            yield key, cfg, field


def _new_value(current, field_type):
    """A valid value of `field_type` that differs from `current` (None for placeholders)."""
    if field_type is bool:
        return not current if current is not None else True
    if field_type is int:
        return current + 3 if current is not None else 7
    if field_type is float:
        return current * 2 + 0.5 if current is not None else 0.25
    if field_type is str:
        return (current or "") + "_new"
    if field_type is tuple:
        return tuple(v + 1 for v in current) if current else (1, 2)
    if field_type is dict:
        return ROPE_SCALING if current != ROPE_SCALING else {**ROPE_SCALING, "factor": 16.0}
    raise AssertionError(f"no test value for type {field_type}")


def _as_text(value):
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_leaf_overridable_on_the_command_line(name):
    cfg = load_config(name)
    expected, args = {}, []
    for key, holder, field in _leaves(cfg):
        field_type = holder.get_type(field)
        assert field_type not in (type(None), list), (
            f"{name}: {key} is {field_type.__name__}; use a typed placeholder / a tuple"
        )
        value = _new_value(holder[field], field_type)
        expected[key] = _jsonable(value)
        args.append(f"--config.{key}={_as_text(value)}")
    assert expected, name
    out = _run_harness([f"--config=configs/{name}", *args])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in expected.items():
        node = got["config"]
        for part in key.split("."):
            node = node[part]
        assert node == value, (name, key)
    # neither the flag machinery nor any config file starts jax (pod configs compute their
    # step budgets with the jax-free herd.lm.ramp)
    assert not got["jax_at_start"] and not got["jax_at_end"]


def test_original_bug_optim_eps_on_the_command_line():
    out = _run_harness(["--config=configs/lm/tiny.py", "--config.optim.eps=1e-6"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["config"]["optim"]["eps"] == 1e-6


def test_relative_config_path_from_another_directory(tmp_path):
    out = _run_harness(["--config=configs/lm/tiny.py", "--config.train.steps=5"], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])["config"]
    assert got["train"]["steps"] == 5 and got["model"]["dim"] == 64  # tiny.py's
    out = _run_harness(["--config=curation/test.py"], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["config"]["hierarchy"]["ks"] == [40, 10]


# run_entry's error handling, on a stand-in run_fn (the real entries import much more).
ENTRY = """
import sys
from herd.core.config import run_entry
def run(cfg, workdir):
    if cfg.train.steps == 13:
        raise FileNotFoundError(f"no such corpus: {workdir}/corpus.txt")
    if cfg.train.steps < 0:
        raise ValueError(f"train.steps must be >= 1, got {cfg.train.steps}")
    print("ran", cfg.train.steps, cfg.optim.eps)
run_entry(run, "lm/tiny.py", "/tmp/herd-test-workdir", "workdir")
"""


def _run_entry(args, cwd=REPO):
    return _run_python(ENTRY, args, cwd)


def _one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--config.train.stpes=3"], ["train.stpes", "did you mean 'steps'", "valid fields:"]),
        (["--config=configs/lm/tiny.py", "--config.nosuch.x=1"], ["nosuch", "model, optim"]),
        (["--config=configs/lm/tiny.py", "--config.train.steps=three"], ["train.steps", "integer"]),
        (["--config.optim.eps=abc"], ["optim.eps", "a float"]),
        (["--config=configs/lm/no_such.py"], ["no_such.py", "does not exist"]),
        (["--no_such_flag=1"], ["no_such_flag"]),
        (["--config.train.steps=-2"], ["train.steps must be >= 1, got -2"]),  # from run_fn
        (["--config.train.steps=13"], ["no such corpus"]),
        (["--num_processes=2"], ["--coordinator_address", "--process_id"]),
        (["stray"], ["unexpected arguments"]),
    ],
)
def test_entry_errors_are_one_line_exit_2(args, needles):
    _one_line_error(_run_entry(args), *needles)


def test_entry_runs_and_verbose_shows_the_traceback(tmp_path):
    out = _run_entry(["--config=configs/lm/tiny.py", "--config.optim.eps=1e-6"], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ran 8 1e-06" in out.stdout
    out = _run_entry(["--config.train.steps=-2", "--verbose"])
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert "train.steps must be >= 1" in out.stderr
