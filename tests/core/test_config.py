"""Config files, --config.key=value overrides and their errors; multi-process flags."""

import os

import pytest

from herd.core import distributed
from herd.core.config import ConfigError, apply_overrides, config_path, load_config


def test_load_default_and_overrides():
    cfg = load_config("configs/lm/tiny.py")
    assert cfg.train.steps == 8 and cfg.optim.eps is None and cfg.model.preset is None
    cfg = load_config(
        "configs/lm/tiny.py",
        [
            "--config.train.steps=3",
            "--config.optim.lr=1e-3",
            "--config.optim.eps=1e-6",  # a placeholder(float): the original bug
            "--config.data.source=text:/tmp/*.txt",
            "--config.train.progress=true",
            "config.model.n_layers=1",  # the prefixes are optional
            "model.n_heads=2",
            "--config.model.preset=llama3-8b",
            "--config.model.dim=none",  # unsets a placeholder
            "--config.mesh.fsdp=2",
            "--config.train.eval_every=1e3",  # an integral float is a fine int
        ],
    )
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.eps == 1e-6 and isinstance(cfg.optim.eps, float)
    assert cfg.data.source == "text:/tmp/*.txt"
    assert cfg.train.progress is True
    assert cfg.model.n_layers == 1 and cfg.model.n_heads == 2
    assert cfg.model.preset == "llama3-8b" and cfg.model.dim is None
    assert cfg.mesh.fsdp == 2
    assert cfg.train.eval_every == 1000 and isinstance(cfg.train.eval_every, int)


def test_tuples_and_dicts():
    cfg = load_config(
        "configs/curation/test.py",
        ["--config.hierarchy.ks=[500, 10]", "--config.hierarchy.sample_sizes=3,4"],
    )
    assert cfg.hierarchy.ks == (500, 10) and cfg.hierarchy.sample_sizes == (3, 4)
    scaling = "{'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}"  # noqa: E501
    cfg = load_config("configs/lm/tiny.py", [f"--config.model.rope_scaling={scaling}"])
    assert cfg.model.rope_scaling["factor"] == 8.0
    assert load_config("configs/lm/llama3_1_8b.py").model.rope_scaling is None  # the preset's


def test_config_path_is_relative_to_installed_package(tmp_path, monkeypatch):
    path = config_path("lm/default.py")
    assert os.path.exists(path)
    monkeypatch.chdir(tmp_path)  # loadable from any working directory
    assert load_config("lm/default.py").model.dim == 128
    assert load_config("configs/lm/tiny.py").model.dim == 64


def test_spec_argument(tmp_path):
    f = tmp_path / "exp.py"
    f.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'size': arg or 'small', 'n': 1})\n"
    )
    assert load_config(str(f)).size == "small"
    assert load_config(f"{f}:big").size == "big"
    assert load_config(f"{f}:big", ["--config.n=2"]).n == 2


def test_unknown_key_names_it_and_the_valid_fields():
    with pytest.raises(ConfigError, match="train.stpes") as e:
        load_config("configs/lm/tiny.py", ["--config.train.stpes=3"])
    assert "did you mean 'steps'" in str(e.value) and "eval_every" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="nosuch.*valid fields: data, mesh, model, optim, train"):
        load_config("configs/lm/tiny.py", ["--config.nosuch.x=3"])
    with pytest.raises(ConfigError, match="train.steps is int, not a group"):
        load_config("configs/lm/tiny.py", ["--config.train.steps.x=3"])
    cfg = load_config("configs/lm/tiny.py")
    with pytest.raises(ConfigError, match="train.stpes"):  # the same parser, in memory
        apply_overrides(cfg, ["--config.train.stpes=3"])
    assert apply_overrides(cfg, ["--config.train.steps=4"]).train.steps == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.steps=three", "'three' for config key 'train.steps': expected an integer"),
        ("--config.train.steps=1.5", "train.steps': expected an integer"),
        ("--config.train.progress=maybe", "train.progress': expected a boolean"),
        ("--config.optim.eps=abc", "optim.eps': expected a float or none"),
        ("--config.model.dim=none2", "model.dim': expected an integer or none"),
        ("--config.model.rope_scaling=[1]", "model.rope_scaling': expected a dict"),
        ("--config.train.steps", "key=value"),
    ],
)
def test_wrong_type_names_key_and_type(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        load_config("configs/lm/tiny.py", [override])
    assert "\n" not in str(e.value)


def test_tuple_elements_keep_their_type():
    with pytest.raises(ConfigError, match="hierarchy.ks': expected a tuple of int"):
        load_config("configs/curation/test.py", ["--config.hierarchy.ks=(1.5, 2)"])


def test_untyped_none_and_lists_are_refused_clearly(tmp_path):
    f = tmp_path / "loose.py"
    f.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'eps': None, 'ks': [1, 2]})\n"
    )
    with pytest.raises(ConfigError, match="'eps' holds None without a type.*placeholder"):
        load_config(str(f), ["--config.eps=1e-6"])
    with pytest.raises(ConfigError, match="'ks' holds a list.*tuple"):
        load_config(str(f), ["--config.ks=(1,)"])


def test_missing_file():
    with pytest.raises(ConfigError, match="no_such_config.py' does not exist"):
        load_config("configs/lm/no_such_config.py")


# -- multi-process launch detection ----------------------------------------------------

SLURM = {
    "SLURM_JOB_ID": "17",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_single_process_does_nothing(monkeypatch):
    for name in [*SLURM, "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"]:
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect_launch(environ={}, on_tpu_vm=False) is None
    assert distributed.maybe_initialize() is None  # this machine: no launcher, no TPU
    import jax

    assert not jax.distributed.is_initialized()


def test_launchers_are_detected():
    detect = distributed.detect_launch
    assert detect(environ=SLURM, on_tpu_vm=False).launcher == "slurm"
    assert detect(environ={**SLURM, "SLURM_NTASKS": "1"}, on_tpu_vm=False) is None
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234", "OMPI_COMM_WORLD_SIZE": "4"}
    assert detect(environ=ompi, on_tpu_vm=False).launcher == "ompi"
    assert detect(environ={"TPU_WORKER_HOSTNAMES": "a,b"}, on_tpu_vm=True).launcher == "tpu"
    assert detect(environ={"TPU_WORKER_HOSTNAMES": "a"}, on_tpu_vm=True) is None
    assert detect(environ={}, on_tpu_vm=True).launcher == "tpu-vm"  # jax asks the metadata
    launch = detect("localhost:1234", 2, 1, environ={}, on_tpu_vm=False)
    assert launch == distributed.Launch(
        "flags", dict(coordinator_address="localhost:1234", num_processes=2, process_id=1)
    )
    # a launcher fills in what the flags leave out
    assert detect(process_id=0, environ=SLURM, on_tpu_vm=False).kwargs == {"process_id": 0}


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_processes=2), "needs --coordinator_address and --process_id"),
        (dict(coordinator_address="localhost:1", num_processes=2), "needs --process_id"),
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), "not host:port"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "valid: 0 to 1"),
        (dict(num_processes=0), "--num_processes must be >= 1"),
    ],
)
def test_flag_errors_are_clear(flags, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect_launch(**flags, environ={}, on_tpu_vm=False)
