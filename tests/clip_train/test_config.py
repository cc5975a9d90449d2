import subprocess
import sys
from pathlib import Path

import pytest

from clip_train.config import Config, load_config, to_yaml
from data_tools.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: /x}\ntrain: {steps: 7}\nmodel: {text: {layers: 2}}\n")
    cfg = load_config(path, ["train.steps=9", "optim.grad_clip=1.5", "model.image.width=null"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 9 and cfg.optim.grad_clip == 1.5 and cfg.model.text.layers == 2
    assert cfg.model.image.width is None and cfg.data.train == "/x"


def test_saved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["data.train=/x", "train.steps=3"])
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_mixed_precision_no_is_the_string_not_yaml_false(tmp_path):
    """YAML 1.1 reads a bare `no` as false; the key takes it as the documented value 'no'."""
    assert (
        load_config(None, ["data.train=/x", "train.mixed_precision=no"]).train.mixed_precision
        == "no"
    )
    preset = tmp_path / "run.yaml"
    preset.write_text("data:\n  train: /x\ntrain:\n  mixed_precision: no\n")
    assert load_config(preset).train.mixed_precision == "no"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stpes=3", ["unknown config key", "train.stpes"]),
        ("train.steps=abc", ["train.steps", "abc"]),
        ("model.text.heads=3", ["model.text.width", "model.text.heads"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision"]),
        ("model.image.patch_init=xavier", ["model.image.patch_init", "lecun, torch", "xavier"]),
        ("nonsense", ["section.key=value"]),
    ],
)
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=/x", override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_required_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_typo_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_train",
            "train",
            "--config",
            "configs/demo.yaml",
            "train.stpes=3",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown config key 'train.stpes'")


def test_shipped_configs_load():
    for name in ("configs/demo.yaml", "configs/bench_tiny.yaml"):
        load_config(name, ["data.train=/x"])


@pytest.mark.parametrize("recipe", ["demo.yaml", "vit_b32_laion.yaml", "vit_b16_datacomp.yaml"])
def test_recipe_option_line_turns_simclr_on(recipe, tmp_path):
    """The one commented line each recipe offers (docs/objectives.md) is a valid objective."""
    text = (Path(__file__).parents[2] / "configs" / recipe).read_text()
    option = "  # terms: [{name: clip}, {name: simclr, weight: 0.5}]\n"
    assert text.count(option) == 1
    on = tmp_path / recipe
    on.write_text(text.replace(option, option.replace("# ", "", 1)))
    cfg = load_config(on, [f"data.train={tmp_path}"])
    assert [(t.name, t.weight) for t in cfg.loss.terms] == [("clip", 1.0), ("simclr", 0.5)]
    assert cfg.model.image_ssl.enabled  # the SSL head comes with the term
    off = load_config(Path(__file__).parents[2] / "configs" / recipe, [f"data.train={tmp_path}"])
    assert off.loss.terms == []  # off unless the line is uncommented
