"""Config files, --config.key=value overrides and their errors."""

import os

import pytest

from herd.core.config import apply_overrides, config_path, load_config


def test_load_default_and_overrides():
    cfg = load_config("configs/lm/tiny.py")
    assert cfg.train.steps == 8
    cfg = load_config(
        "configs/lm/tiny.py",
        [
            "--config.train.steps=3",
            "--config.optim.lr=1e-3",
            "--config.data.source=text:/tmp/*.txt",
            "--config.train.progress=true",
            "config.model.n_layers=1",
            "--config.model.preset=llama3-8b",  # None field takes any literal / string
            "--config.mesh.fsdp=2",
        ],
    )
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.data.source == "text:/tmp/*.txt"
    assert cfg.train.progress is True
    assert cfg.model.n_layers == 1
    assert cfg.model.preset == "llama3-8b"
    assert cfg.mesh.fsdp == 2


def test_config_path_is_relative_to_installed_package():
    path = config_path("lm/default.py")
    assert os.path.exists(path)
    # also loadable from any working directory by its package-relative name
    assert load_config("lm/default.py").model.dim > 0


def test_spec_argument(tmp_path):
    f = tmp_path / "exp.py"
    f.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'size': arg or 'small', 'n': 1})\n"
    )
    assert load_config(str(f)).size == "small"
    assert load_config(f"{f}:big").size == "big"


def test_unknown_key_names_it():
    cfg = load_config("configs/lm/tiny.py")
    with pytest.raises(ValueError, match="train.stpes"):
        apply_overrides(cfg, ["--config.train.stpes=3"])
    with pytest.raises(ValueError, match="nosuch"):
        apply_overrides(cfg, ["--config.nosuch.x=3"])


def test_bad_values():
    cfg = load_config("configs/lm/tiny.py")
    with pytest.raises(ValueError, match="train.steps"):
        apply_overrides(cfg, ["--config.train.steps=three"])
    with pytest.raises(ValueError, match="train.progress"):
        apply_overrides(cfg, ["--config.train.progress=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["--config.train.steps"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config("configs/lm/no_such_config.py")
