"""SIGKILL at every phase of a two-stage run, then resume: every tensor (buffers included) of
each stage's model and of the final model equals the uninterrupted run's, to the bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_faults import config
from vlmkit.config import parse_config
from vlmkit.train.runner import train

# Run in a subprocess: patch one phase to end the process with SIGKILL, as `kill -9` would.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import torch
    import yaml
    from transformers import Trainer

    import vlmkit.train.runner as runner
    from vlmkit.config import parse_config
    from vlmkit.models.adapters.vlm import VLMAdapter
    from vlmkit.train.trainer import VlmkitTrainer

    torch.set_num_threads(1)
    phase, path = sys.argv[1], Path(sys.argv[2])
    raw = yaml.safe_load(path.read_text())
    run = Path(raw["output_dir"])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "mid_step":  # stage a's third step: gradients computed, no optimizer step yet
        original_step = VlmkitTrainer.training_step

        def step(self, *args, **kwargs):
            loss = original_step(self, *args, **kwargs)
            if Path(self.args.output_dir).name == "1-a" and self.state.global_step == 2:
                die()
            return loss

        VlmkitTrainer.training_step = step
    elif phase == "mid_checkpoint":  # stage a's last checkpoint: weights, optimizer written; no state
        original_save = Trainer._save_optimizer_and_scheduler

        def save(self, output_dir):
            original_save(self, output_dir)
            if "1-a" in str(output_dir) and output_dir.rstrip("/").endswith("checkpoint-4"):
                die()

        Trainer._save_optimizer_and_scheduler = save
    elif phase == "after_last_checkpoint":  # stage a trained and checkpointed; its model/ not begun
        original_write = runner.write_model

        def write(folder, *args):
            if folder == run / "1-a" / "model":
                die()
            return original_write(folder, *args)

        runner.write_model = write
    elif phase in ("mid_stage_model", "mid_final_model"):  # the folder written, not yet renamed
        target = run / "1-a" / ".model.incomplete" if phase == "mid_stage_model" else run / ".model.incomplete"
        original_adapter_save = VLMAdapter.save

        def adapter_save(self, out_dir, **kwargs):
            original_adapter_save(self, out_dir, **kwargs)
            if Path(out_dir) == target:
                die()

        VLMAdapter.save = adapter_save
    elif phase == "between_stages":  # stage a's model written; stage b not begun
        original_stage = runner.train_stage

        def stage(adapter, config, stage, *args):
            if stage.name == "b":
                die()
            return original_stage(adapter, config, stage, *args)

        runner.train_stage = stage
    else:
        raise SystemExit(f"unknown phase {phase}")
    runner.train(parse_config(raw))
    raise SystemExit("the run ended without being killed")
    """
)
PHASES = (
    "mid_step",
    "mid_checkpoint",
    "after_last_checkpoint",
    "mid_stage_model",
    "between_stages",
    "mid_final_model",
)


def two_stages(tmp_path: Path, name: str) -> dict:
    """Stage a trains everything, stage b freezes the (BatchNorm) tower; 4 steps each, ending
    mid-epoch, a checkpoint every 2."""
    raw = config(tmp_path, name, max_steps=4, save_steps=2, save_total_limit=3)
    raw["stages"] = [{"name": "a"}, {"name": "b", "freeze": {"vision": True}}]
    return raw


def tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    folders = {"1-a": run / "1-a" / "model", "2-b": run / "2-b" / "model", "final": run / "model"}
    return {name: load_file(folder / "model.safetensors") for name, folder in folders.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess: sums are ordered by the thread count
    try:
        result = train(parse_config(two_stages(tmp_path_factory.mktemp("straight"), "straight")))
    finally:
        torch.set_num_threads(threads)
    return tensors(result.run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_killed_at_each_phase_then_resumed_equals_the_uninterrupted_run(tmp_path, phase, reference):
    raw = two_stages(tmp_path, "killed")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, phase, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -9, done.stderr[-3000:]  # killed where the phase says, not before
    run = tmp_path / "killed"
    assert not (run / "model").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(parse_config(raw))
    finally:
        torch.set_num_threads(threads)
    resumed = tensors(run)
    assert resumed.keys() == reference.keys()
    for folder, expected in reference.items():
        assert resumed[folder].keys() == expected.keys(), folder
        assert any(name.endswith("num_batches_tracked") for name in expected)  # buffers are compared
        for name, tensor in expected.items():
            assert torch.equal(resumed[folder][name], tensor), f"{folder}: {name}"
    assert not list(run.rglob("*.incomplete"))  # no staging folder is left behind
