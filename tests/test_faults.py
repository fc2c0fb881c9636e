"""Training through faults: exact resume after SIGKILL, atomic checkpoints, NaN guards, disk errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_LM, TINY_VISION
from vlmkit.config import parse_config
from vlmkit.errors import VlmkitError
from vlmkit.train.runner import train


def config(tmp_path: Path, name: str, **training) -> dict:
    return {
        "name": name,
        "seed": 7,
        "output_dir": str(tmp_path / name),
        "model": {
            "init": {
                "vision": {"config": TINY_VISION},
                "language_model": {"config": TINY_LM},
                "image_size": 32,
            }
        },
        "data": {"train": {"source": "easyvqa", "split": "train", "limit": 96}},
        "training": {
            "per_device_train_batch_size": 8,
            "max_steps": 8,
            "learning_rate": 3e-3,
            "save_steps": 2,
            "save_total_limit": 2,
            "logging_steps": 1,
            "use_cpu": True,
            **training,
        },
    }


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the killed subprocess (OMP_NUM_THREADS=1): a matmul's sums
    are ordered by the thread count, so runs compared to the last bit must share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, one_thread):
    long = {"max_steps": 40, "save_steps": 10}
    reference = train(parse_config(config(tmp_path, "straight", **long)))
    raw = config(tmp_path, "killed", **long)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmkit", "train", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while not (run / "checkpoint-10").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / "checkpoint-10").exists() and not (run / "model").exists()
    resumed = train(parse_config(raw), resume=True)
    resumed_from = json.loads((run / "metrics.json").read_text())["resumed_from"]
    assert resumed_from.endswith(("checkpoint-10", "checkpoint-20", "checkpoint-30"))
    final, expected = weights(resumed.run_dir), weights(reference.run_dir)
    for name, tensor in expected.items():
        assert torch.allclose(final[name], tensor, atol=1e-6), name


def test_checkpoints_are_complete_and_rotation_keeps_the_newest(tmp_path):
    result = train(parse_config(config(tmp_path, "rot")))
    names = sorted(p.name for p in result.run_dir.glob("checkpoint-*"))
    assert names == ["checkpoint-6", "checkpoint-8"]
    for name in names:
        files = {p.name for p in (result.run_dir / name).iterdir()}
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not (result.run_dir / ".incomplete").exists()


def test_a_crash_mid_checkpoint_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    from transformers import Trainer

    def crash(self, output_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash)
    with pytest.raises(VlmkitError, match="disk full"):
        train(parse_config(config(tmp_path, "full")))
    run = tmp_path / "full"
    assert not list(run.glob("checkpoint-*"))  # the half-written one stayed in .incomplete


def test_a_crash_while_writing_the_model_leaves_no_model_folder(tmp_path, monkeypatch):
    """save_pretrained writes config.json first; a folder holding it must be a whole model."""
    from vlmkit.models.adapters.vlm import VLMAdapter

    original = VLMAdapter.save

    def crash(self, out_dir, **kwargs):
        original(self, out_dir, **kwargs)
        (Path(out_dir) / "model.safetensors").unlink()  # as if the disk filled mid-write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VLMAdapter, "save", crash)
    with pytest.raises(VlmkitError, match=r"disk full while writing \S+crash/model \(needs about 0\.\d MB"):
        train(parse_config(config(tmp_path, "crash", max_steps=1, save_strategy="no")))
    run = tmp_path / "crash"
    assert not (run / "model").exists() and not list(run.glob(".model*"))


def test_a_rewritten_folder_replaces_the_old_one_whole(tmp_path):
    from vlmkit.folders import write_folder

    def write(files):
        def into(folder):
            folder.mkdir()
            for name in files:
                (folder / name).write_text(name)

        return into

    write_folder(tmp_path / "model", write(["config.json", "old.bin"]))
    write_folder(tmp_path / "model", write(["config.json", "new.bin"]))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or previous left


def poison_forward(monkeypatch, calls_poisoned) -> None:
    """Make the loss NaN on the forward calls numbered in `calls_poisoned` (1-based; a callable or a set)."""
    from vlmkit.models.vlm import VisionLanguageModel

    original = VisionLanguageModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        hit = calls_poisoned(calls["n"]) if callable(calls_poisoned) else calls["n"] in calls_poisoned
        if hit and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VisionLanguageModel, "forward", poisoned)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_naming_step_and_samples(tmp_path, monkeypatch, policy):
    poison_forward(monkeypatch, {3})
    raw = config(tmp_path, f"nan-{policy}", max_steps=4, save_steps=4, save_total_limit=None)
    raw["guard"] = {"on_nonfinite": policy}
    if policy == "stop":
        with pytest.raises(VlmkitError, match=r"loss is nan at step 3 on samples \[easyvqa-train-"):
            train(parse_config(raw))
        assert not (tmp_path / raw["name"] / "model").exists()
    else:
        result = train(parse_config(raw))
        metrics = json.loads((result.run_dir / "metrics.json").read_text())
        assert metrics["skipped_nonfinite_steps"] == [3]
        assert all(torch.isfinite(t).all() for t in weights(result.run_dir).values())
        # the skipped step moved nothing: AdamW stepped 3 times of 4, the scheduler too
        checkpoint = result.run_dir / "checkpoint-4"
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert {int(s["step"]) for s in optimizer["state"].values()} == {3}
        assert torch.load(checkpoint / "scheduler.pt", weights_only=True)["last_epoch"] == 3


def test_a_skipped_step_leaves_weights_and_moments_as_they_were(tmp_path, monkeypatch):
    """Steps 1-2 then a NaN step 3 == steps 1-2: the checkpoint after the skip equals the one before."""
    poison_forward(monkeypatch, {3})
    raw = config(tmp_path, "skip", max_steps=3, save_steps=1, save_total_limit=None, learning_rate=1e-2)
    raw["guard"] = {"on_nonfinite": "skip"}
    run = train(parse_config(raw)).run_dir
    before, after = run / "checkpoint-2", run / "checkpoint-3"
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    trainable = [n for n in a if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(a[n], b[n]) for n in trainable)
    opt_a = torch.load(before / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(after / "optimizer.pt", weights_only=True)["state"]
    for key, state in opt_a.items():
        assert torch.equal(state["exp_avg"], opt_b[key]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], opt_b[key]["exp_avg_sq"])


def test_persistent_nonfinite_loss_stops_after_n_skips_and_writes_no_model(tmp_path, monkeypatch):
    poison_forward(monkeypatch, lambda n: n >= 2)
    raw = config(tmp_path, "diverged", max_steps=8, save_strategy="no")
    raw["guard"] = {"on_nonfinite": "skip", "max_consecutive_skips": 3}
    with pytest.raises(VlmkitError, match=r"3 steps in a row skipped .*step 4 on samples \[easyvqa-train-"):
        train(parse_config(raw))
    assert not (tmp_path / "diverged" / "model").exists()


def test_a_model_with_nonfinite_weights_is_never_written(tmp_path, monkeypatch):
    """Weights that overflowed without a non-finite loss (the step that made them) are refused at save."""
    from vlmkit.train.trainer import VlmkitTrainer

    original = VlmkitTrainer._maybe_log_save_evaluate

    def overflow(self, *args, **kwargs):
        if self.state.global_step == 2:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).fill_(float("inf"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VlmkitTrainer, "_maybe_log_save_evaluate", overflow)
    raw = config(tmp_path, "inf", max_steps=2, save_steps=2)
    with pytest.raises(VlmkitError, match=r"not writing checkpoint-2: \d+ tensors hold NaN/inf"):
        train(parse_config(raw))
    run = tmp_path / "inf"
    assert not list(run.glob("checkpoint-*")) and not (run / "model").exists()


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(VlmkitError):
        train(parse_config({**config(tmp_path, "x"), "output_dir": str(locked / "run")}))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(tmp_path):
    """k DDP steps on 2 CPU processes (gloo) == 1 process with gradient accumulation 2."""
    common = {"max_steps": 3, "save_strategy": "no", "logging_steps": 1, "dataloader_drop_last": True}
    single = train(
        parse_config(
            config(tmp_path, "single", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
        )
    )
    raw = config(
        tmp_path,
        "ddp",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        ddp_backend="gloo",
        **common,
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "vlmkit",
        "train",
        str(path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp, expected = weights(tmp_path / "ddp"), weights(single.run_dir)
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics, not weights
    compared = [name for name in expected if not name.endswith(buffers)]
    assert len(compared) > 20
    for name in compared:
        assert torch.allclose(ddp[name], expected[name], atol=1e-5), name
    # a checkpoint written by the 2-process run loads in one process
    from vlmkit.models.adapters import load_adapter

    assert load_adapter(tmp_path / "ddp" / "model").model.num_parameters() > 0
