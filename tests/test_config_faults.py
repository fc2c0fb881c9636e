"""Broken configs: each is a one-line ConfigError naming the key and the fix, found before torch
or transformers is imported; nothing is silently accepted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vlmkit.config import load_config, read_config_file
from vlmkit.errors import ConfigError
from vlmkit.hf_schema import SCHEMA_FILE, introspect

BASE = {
    "name": "t",
    "model": {
        "init": {
            "vision": {
                "config": {
                    "model_type": "resnet",
                    "embedding_size": 8,
                    "hidden_sizes": [8, 16],
                    "depths": [1, 1],
                }
            },
            "language_model": {
                "config": {
                    "model_type": "qwen2",
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 4,
                }
            },
            "image_size": 32,
        }
    },
    "data": {"train": {"source": "easyvqa", "split": "train", "limit": 16}},
    "training": {"per_device_train_batch_size": 8, "max_steps": 1, "learning_rate": 1.0e-3},
}

CASES = [
    (
        ["model.init.projector=mlpx"],
        r"model\.init\.projector: projector 'mlpx' is not one of linear, mlp, resampler",
    ),
    (
        ["model.init.vision.config.model_type=resnetx"],
        r"'resnetx' is not a supported backbone \(did you mean resnet\?\)",
    ),
    (
        ["model.init.language_model.config.model_type=qwen3x"],
        r"'qwen3x' is not one transformers knows; did you mean",
    ),
    (["training.learning_rate=fast"], r"training\.learning_rate: 'fast' is not a number"),
    (["training.learning_rate=-1"], r"training\.learning_rate: -1 must be at least 0"),
    (["training.per_device_train_batch_size=0"], r"per_device_train_batch_size: 0 must be at least 1"),
    (["training.per_device_train_batch_size=[8]"], r"per_device_train_batch_size: \[8\] is not an integer"),
    (
        ["training.lr_scheduler_type=cosin"],
        r"lr_scheduler_type: 'cosin' is not a choice; did you mean 'cosine'\?",
    ),
    (["training.optim=adamw"], r"training\.optim: 'adamw' is not a choice"),
    (["training.save_strategy=never"], r"save_strategy: 'never' is not a choice; .*choose one of"),
    (["training.num_train_epoch=3"], r"training\.num_train_epoch \(did you mean num_train_epochs\?\)"),
    (
        ["freeze.vision=true", "freeze.projector=true", "freeze.lm=true"],
        r"the run freezes the vision tower, the projector and the LM, and adds no LoRA: nothing would train",
    ),
    (
        [
            "model.init.language_model.config.num_attention_heads=7",
            "model.init.language_model.config.num_key_value_heads=7",
        ],
        r"hidden_size 32 is not divisible by num_attention_heads 7",
    ),
    (
        ["model.init.language_model.config.num_key_value_heads=3"],
        r"num_attention_heads 4 is not a multiple of num_key_value_heads 3",
    ),
    (["stages=[{name: a}, {name: a}]"], r"stage name\(s\) 'a' used twice"),
    (["training=["], r"--set 'training=\[': the value is not valid YAML"),
]


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"), CASES, ids=[c[0][0].split("=")[0] + str(i) for i, c in enumerate(CASES)]
)
def test_a_broken_config_is_one_line_naming_the_key(base_file, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(base_file, overrides)
    assert "\n" not in str(caught.value)


def test_numbers_yaml_reads_as_text_are_converted_and_the_base_config_loads(base_file):
    config = load_config(base_file, ["training.learning_rate=2e-5", "training.save_strategy=no"])
    assert config.training["learning_rate"] == 2e-5 and config.training["save_strategy"] == "no"


def test_a_typo_inside_a_part_config_is_refused_when_the_model_is_built(base_file):
    """The one check that needs transformers' config classes: before the tokenizer is trained."""
    from vlmkit.models.build import build_vlm

    config = load_config(base_file, ["model.init.vision.config.hiden_sizes=[8,16]"])
    with pytest.raises(
        ConfigError,
        match=r"vision\.config\.hiden_sizes: ResNetConfig has no such field; did you mean hidden_sizes\?",
    ):
        build_vlm(config.model.init, texts=None)


def test_validating_a_config_imports_neither_torch_nor_transformers(base_file):
    script = textwrap.dedent(
        f"""
        import sys
        from vlmkit.config import load_config
        from vlmkit.errors import ConfigError
        load_config({str(base_file)!r})
        try:
            load_config({str(base_file)!r}, ["training.lr_scheduler_type=cosin"])
        except ConfigError:
            pass
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_the_cli_refuses_a_broken_config_before_importing_torch(base_file):
    script = textwrap.dedent(
        f"""
        import sys
        sys.argv = ["vlmkit", "train", {str(base_file)!r}, "--set", "training.learning_rate=fast"]
        from vlmkit.cli import main
        try:
            main()
        except SystemExit as stop:
            print(stop.code, "torch" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0 and "learning_rate: 'fast'" in done.stderr


def test_the_shipped_schema_is_the_installed_transformers(monkeypatch):
    """hf_schema.json must be regenerated (`make schema`) when the lock moves transformers."""
    shipped = json.loads(SCHEMA_FILE.read_text())
    lock = (Path(__file__).resolve().parents[1] / "requirements" / "lock-cpu.txt").read_text()
    assert f"transformers=={shipped['transformers']}\n" in lock, "run `make schema` after `make lock`"
    live = introspect()
    if live["transformers"] != shipped["transformers"]:
        pytest.skip(f"transformers {live['transformers']} is not the locked {shipped['transformers']}")
    assert live == shipped


def test_read_config_file_keeps_unknown_sections_for_the_validator(base_file):
    raw = read_config_file(base_file, ["trainng.max_steps=2"])
    with pytest.raises(ConfigError, match=r"trainng: unknown key"):
        from vlmkit.config import parse_config

        parse_config(raw)
