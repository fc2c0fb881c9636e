"""FSDP2 (full shard) on CPU processes over gloo, launched with the shipped configs/accelerate/fsdp.yaml."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_DINOV2, tiny_spec
from test_faults import config
from vlmkit.config import parse_config
from vlmkit.errors import ConfigError
from vlmkit.models.adapters import load_adapter
from vlmkit.models.build import build_vlm
from vlmkit.train.runner import train
from vlmkit.train.trainer import check_fsdp_loading

FSDP_LAUNCH = Path(__file__).resolve().parents[1] / "src" / "vlmkit" / "configs" / "accelerate" / "fsdp.yaml"


def dinov2_config(tmp_path: Path, name: str, **training) -> dict:
    raw = config(tmp_path, name, **training)
    raw["model"]["init"]["vision"] = {"config": TINY_DINOV2}
    return raw


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_fsdp_on_two_cpus(tmp_path: Path) -> None:
    """`vlmkit train tmp_path/fsdp.yaml` under the shipped launch file, changed only to 2 CPU
    processes in float32 (bf16 would not match a float32 single-process run)."""
    launch = {**yaml.safe_load(FSDP_LAUNCH.read_text()), "num_processes": 2, "mixed_precision": "no"}
    (tmp_path / "launch.yaml").write_text(yaml.safe_dump(launch))
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "launch.yaml")),
        *("--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())),
        *("-m", "vlmkit", "train", str(tmp_path / "fsdp.yaml")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_with_accumulation(tmp_path):
    """3 FSDP2 steps on 2 CPU processes == 1 process with gradient accumulation 2; model/ is whole."""
    common = {"max_steps": 3, "per_device_train_batch_size": 4, "dataloader_drop_last": True}
    single = train(
        parse_config(
            dinov2_config(tmp_path, "single", gradient_accumulation_steps=2, save_strategy="no", **common)
        )
    )
    run = tmp_path / "fsdp"
    (tmp_path / "fsdp.yaml").write_text(
        yaml.safe_dump(dinov2_config(tmp_path, "fsdp", save_steps=2, **common))
    )
    train_fsdp_on_two_cpus(tmp_path)

    # It was FSDP, not a silent fallback to DDP: sharded checkpoints, and the units vlmkit's
    # `_no_split_modules` names (DINOv2 layers + embeddings, Qwen2 decoder layers) were wrapped.
    assert len(list((run / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    units = json.loads((run / "metrics.json").read_text())["fsdp_units"]
    assert {"Dinov2Layer": 2, "Dinov2Embeddings": 1, "Qwen2DecoderLayer": 2}.items() <= units.items()

    # model/ holds the full (gathered) weights, equal to the 1-process run's.
    sharded = load_file(run / "model" / "model.safetensors")
    expected = load_file(single.run_dir / "model" / "model.safetensors")
    assert sharded.keys() == expected.keys() and len(expected) > 20
    for name, tensor in expected.items():
        assert sharded[name].shape == tensor.shape, name
        assert torch.allclose(sharded[name], tensor, atol=1e-5), name
    # and loads in one process
    adapter = load_adapter(run / "model")
    assert adapter.model.num_parameters() == sum(t.numel() for t in expected.values())

    # Run again without the final checkpoint: it resumes from the sharded checkpoint-2 (model,
    # optimiser, scheduler, RNG, data position) and redoes step 3, ending with the same weights.
    shutil.rmtree(run / "checkpoint-3")
    (run / "model" / "model.safetensors").unlink()
    train_fsdp_on_two_cpus(tmp_path)
    assert json.loads((run / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-2")
    resumed = load_file(run / "model" / "model.safetensors")
    for name, tensor in sharded.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name


def test_fsdp2_rank0_loading_with_buffers_is_a_clear_error():
    """accelerate's FSDP2 rank-0 loading cannot place buffers (BatchNorm statistics of a ResNet tower)."""
    plugin = SimpleNamespace(fsdp_version=2, cpu_ram_efficient_loading=True)
    resnet = build_vlm(tiny_spec(), ["a question"]).model
    with pytest.raises(ConfigError, match=r"running_mean.*fsdp_cpu_ram_efficient_loading: false"):
        check_fsdp_loading(plugin, resnet)
    check_fsdp_loading(SimpleNamespace(fsdp_version=2, cpu_ram_efficient_loading=False), resnet)
    check_fsdp_loading(plugin, build_vlm(tiny_spec(vision={"config": TINY_DINOV2}), ["a question"]).model)


@pytest.mark.slow
def test_two_process_fsdp_lora_equals_one_process_and_saves_a_loadable_folder(tmp_path):
    """LoRA on a composed VLM under FSDP2: the gathered adapter equals one process's, and the folder
    carries its base (base/), so the run's reload for evaluation works."""
    common = {"max_steps": 3, "per_device_train_batch_size": 4, "dataloader_drop_last": True}

    def lora_config(name: str, **training) -> dict:
        raw = dinov2_config(tmp_path, name, **training)
        raw["model"]["lora"] = {"r": 4, "dropout": 0.0}
        return raw

    single = train(
        parse_config(lora_config("single", gradient_accumulation_steps=2, save_strategy="no", **common))
    )
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(lora_config("fsdp", save_strategy="no", **common)))
    train_fsdp_on_two_cpus(tmp_path)
    model = tmp_path / "fsdp" / "model"
    assert "PeftModel" in json.loads((model.parent / "metrics.json").read_text())["fsdp_units"]
    ours, expected = (load_file(m / "adapter_model.safetensors") for m in (model, single.model_dir))
    assert ours.keys() == expected.keys() and any("lora_B" in k for k in expected)
    for name, tensor in expected.items():
        assert torch.allclose(ours[name], tensor, atol=1e-5), name
    base, single_base = (load_file(m / "base" / "model.safetensors") for m in (model, single.model_dir))
    assert base.keys() == single_base.keys() and all(torch.equal(base[k], single_base[k]) for k in base)
    assert load_adapter(model).model.peft_config["default"].r == 4
