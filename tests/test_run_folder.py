"""Resume that trusts nothing: final-step checkpoints, fingerprints, damaged checkpoints, the lock,
and disk/permission faults as one line."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_faults import config
from vlmkit.config import parse_config
from vlmkit.errors import VlmkitError
from vlmkit.train.run_folder import RunLock, damage, differing_keys
from vlmkit.train.runner import train


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def small(tmp_path: Path, name: str = "run", **training) -> dict:
    """3 steps of a 12-step epoch (max_steps ends mid-epoch), a checkpoint at steps 2 and 3."""
    return config(tmp_path, name, max_steps=3, save_steps=2, save_total_limit=None, **training)


def test_resume_from_the_final_checkpoint_trains_no_extra_step(tmp_path, caplog):
    raw = small(tmp_path)
    run = train(parse_config(raw)).run_dir
    reference = tensors(run / "model")
    # killed after the last checkpoint, before model/ and the finished mark
    shutil.rmtree(run / "model")
    fp = json.loads((run / "fingerprint.json").read_text())
    (run / "fingerprint.json").write_text(json.dumps({**fp, "finished": False}))
    train(parse_config(raw))
    assert_same(tensors(run / "model"), reference)
    assert not (run / "checkpoint-4").exists()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3


def test_rerunning_a_finished_run_changes_nothing_and_says_so(tmp_path, caplog):
    raw = small(tmp_path)
    run = train(parse_config(raw)).run_dir
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    train(parse_config(raw))
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    assert "already finished" in caplog.text


def test_a_changed_config_is_refused_naming_the_keys_unless_accepted(tmp_path):
    raw = small(tmp_path)
    train(parse_config(raw))
    changed = small(tmp_path, learning_rate=1e-3)
    changed["training"]["logging_steps"] = 5  # neutral: not named
    with pytest.raises(
        VlmkitError, match=r"different config or data \(training\.learning_rate\); .*--accept-changes"
    ):
        train(parse_config(changed))
    assert yaml_lr(tmp_path / "run") == 3e-3  # config.yaml still tells the truth
    train(parse_config(changed), accept_changes=True)


def yaml_lr(run: Path) -> float:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["training"]["learning_rate"]


def test_changed_data_is_named(tmp_path):
    train(parse_config(small(tmp_path)))
    raw = small(tmp_path)
    raw["data"]["train"]["limit"] = 80
    with pytest.raises(VlmkitError, match=r"data of stage 1"):
        train(parse_config(raw))


def test_another_runs_folder_is_refused_without_resume_flag(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(VlmkitError, match=r"holds checkpoints or a model of another run .*--no-resume"):
        train(parse_config(small(tmp_path)))


@pytest.mark.parametrize(
    "fault", ["truncate-weights", "delete-weights", "delete-optimizer", "delete-scheduler"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, fault, caplog):
    raw = config(tmp_path, "run", max_steps=4, save_steps=2, save_total_limit=None)
    run = train(parse_config(raw)).run_dir
    reference = tensors(run / "model")
    shutil.rmtree(run / "model")  # killed before the model was written
    newest = run / "checkpoint-4"
    target = {
        "truncate-weights": "model.safetensors",
        "delete-weights": "model.safetensors",
        "delete-optimizer": "optimizer.pt",
        "delete-scheduler": "scheduler.pt",
    }[fault]
    if fault.startswith("truncate"):
        data = (newest / target).read_bytes()
        (newest / target).write_bytes(data[: len(data) // 2])
    else:
        (newest / target).unlink()
    assert damage(newest) is not None
    result = train(parse_config(raw), resume=True)
    assert result.stages[0]["resumed_from"].endswith("checkpoint-2")
    assert "cannot be resumed from" in caplog.text and target in caplog.text
    assert_same(tensors(run / "model"), reference)


def test_a_second_run_in_the_same_folder_refuses_at_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()
    try:
        with pytest.raises(VlmkitError, match=r"in use by another run \(pid \d+\)"):
            train(parse_config(small(tmp_path)))
    finally:
        lock.release()


def test_differing_keys_are_dotted_paths():
    old = {"training": {"learning_rate": 1, "max_steps": 3}, "stages": [{"name": "a"}]}
    new = {"training": {"learning_rate": 2, "max_steps": 3}, "stages": [{"name": "b"}]}
    assert differing_keys(old, new) == ["stages.0.name", "training.learning_rate"]


# -- disk and permission faults ---------------------------------------------------------------
def test_torch_save_runtime_error_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    from vlmkit.train import trainer as ours

    def full(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(hf_trainer.torch, "save", full)
    monkeypatch.setattr(ours, "free_bytes", lambda where: 1000)
    with pytest.raises(
        VlmkitError,
        match=r"disk full while writing \S+checkpoint-2 \(needs about [\d.]+ MB, 0\.0 MB free\); free space there, or set training.save_total_limit lower",
    ):
        train(parse_config(small(tmp_path)))
    run = tmp_path / "run"
    assert not (run / ".incomplete").exists() and not list(run.glob("checkpoint-*"))


def test_safetensors_error_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(modeling, "safe_save_file", full)
    with pytest.raises(VlmkitError, match=r"disk full while writing \S+checkpoint-2"):
        train(parse_config(small(tmp_path)))


@pytest.mark.parametrize("where", ["run folder", "config.yaml"])
def test_read_only_output_is_one_line(tmp_path, monkeypatch, where):
    original_mkdir, original_write = Path.mkdir, Path.write_text

    def mkdir(self, *args, **kwargs):
        if self.name == "run":
            raise OSError(errno.EROFS, "Read-only file system")
        return original_mkdir(self, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        if self.name == "config.yaml":
            raise PermissionError(errno.EACCES, "Permission denied")
        return original_write(self, *args, **kwargs)

    monkeypatch.setattr(
        Path,
        "mkdir" if where == "run folder" else "write_text",
        mkdir if where == "run folder" else write_text,
    )
    match = (
        r"read-only file system: cannot write \S+run;"
        if where == "run folder"
        else r"no permission: cannot write \S+run;"
    )
    with pytest.raises(VlmkitError, match=match):
        train(parse_config(small(tmp_path)))


def test_a_short_disk_removes_old_checkpoints_before_writing_a_new_one(tmp_path, monkeypatch):
    from transformers import Trainer

    from vlmkit.train import trainer as ours

    seen = []
    original = Trainer._save_checkpoint

    def spy(self, model, trial):
        run = Path(self.args.output_dir)
        seen.append(sorted(p.name for p in run.glob("checkpoint-*")))
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", spy)
    monkeypatch.setattr(ours, "free_bytes", lambda where: 0)
    train(parse_config(config(tmp_path, "run", max_steps=6, save_steps=2, save_total_limit=2)))
    assert seen == [[], ["checkpoint-2"], ["checkpoint-4"]]  # limit 2: the oldest goes first
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
