"""Every CLI command end to end on tiny configs, and every bad input's one-line error."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import tiny_config
from vlmkit import cli


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["vlmkit", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(tmp_path, config: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture()
def easyvqa_image():
    from vlmkit.data.sources import load_samples

    return load_samples({"source": "easyvqa", "split": "test", "limit": 1})[0].image


def test_train_eval_chat_end_to_end(tmp_path, monkeypatch, capsys, easyvqa_image):
    config = write_config(tmp_path, tiny_config(tmp_path))
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config), "--set", "training.max_steps=3")
    assert code == 0, err
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "metrics.json", "loss.png", "trainable.json"):
        assert (run / name).exists(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["max_steps"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["bad_samples"] == 0
    assert json.loads((run / "run.json").read_text())["versions"]["torch"]
    model = run / "model"
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    assert (model / "preprocessor_config.json").exists()

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        str(model),
        "--data",
        "easyvqa:test",
        "--limit",
        "10",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "ev"),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n"] == 10 and summary["metric"] == "exact_match" and "exact_match" in out
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 10

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "chat",
        "--model",
        str(model),
        "--image",
        easyvqa_image,
        "--question",
        "what color is the shape?",
    )
    assert code == 0, err
    assert out.strip()

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("what shape is it?\nis it red?\nexit\n"))
    code, out, err = run_cli(monkeypatch, capsys, "chat", "--model", str(model), "--image", easyvqa_image)
    assert code == 0, err
    assert out.count("you>") == 3


def test_eval_resumes_and_skips_done_ids(tmp_path, tiny_vlm_dir, monkeypatch, capsys):
    out_dir = tmp_path / "ev"
    args = [
        "eval",
        "--model",
        str(tiny_vlm_dir),
        "--data",
        "easyvqa:test",
        "--batch-size",
        "4",
        "--out",
        str(out_dir),
    ]
    assert run_cli(monkeypatch, capsys, *args, "--limit", "6")[0] == 0
    first = (out_dir / "predictions.jsonl").read_text().splitlines()
    calls = []
    from vlmkit.models.adapters.base import ModelAdapter

    original = ModelAdapter.generate
    monkeypatch.setattr(
        ModelAdapter,
        "generate",
        lambda self, samples, **kw: calls.append(len(samples)) or original(self, samples, **kw),
    )
    assert run_cli(monkeypatch, capsys, *args, "--limit", "9")[0] == 0
    assert sum(calls) == 3  # only the three new samples were generated
    lines = (out_dir / "predictions.jsonl").read_text().splitlines()
    assert lines[:6] == first and len(lines) == 9


def test_demo_runs_tiny(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--set",
        "training.max_steps=2",
        "--set",
        "data.eval.limit=8",
        "--set",
        "data.train.limit=64",
        "--set",
        "model.init.language_model.config.num_hidden_layers=1",
    )
    assert code == 0, err
    assert "exact_match" in out and "vlmkit chat --model" in out
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "demo" / "eval" / "summary.json").read_text())["n"] == 8
    # The closing hint is a command that runs as printed: a real image and its question.
    hint = next(line for line in out.splitlines() if "vlmkit chat --model" in line)
    argv = shlex.split(hint.split("try:", 1)[1])
    assert Path(argv[argv.index("--image") + 1]) == tmp_path / "demo" / "example.png"
    assert (tmp_path / "demo" / "example.png").is_file()
    code, _, err = run_cli(monkeypatch, capsys, *argv[1:])  # a 2-step model may answer nothing
    assert code == 0, err


def test_training_lowers_the_loss(tmp_path):
    from vlmkit.config import parse_config
    from vlmkit.train.runner import train

    config = parse_config(
        tiny_config(
            tmp_path,
            **{
                "training.max_steps": 40,
                "training.logging_steps": 5,
                "training.learning_rate": 5e-3,
                "data.train": {"source": "easyvqa", "split": "train", "limit": 128},
            },
        )
    )
    result = train(config)
    losses = [
        row["loss"]
        for row in json.loads((result.run_dir / "metrics.json").read_text())["history"]
        if "loss" in row
    ]
    assert losses[-1] < 0.6 * losses[0]


def test_frozen_parts_stay_bit_identical(tmp_path):
    import torch

    from vlmkit.config import parse_config
    from vlmkit.models.adapters import load_adapter
    from vlmkit.train import runner

    config = parse_config(tiny_config(tmp_path, freeze={"vision": True, "lm": True}))
    captured = {}
    original = runner.build_model

    def keep_initial(cfg, samples):
        adapter = original(cfg, samples)
        captured.update({k: v.clone() for k, v in adapter.model.state_dict().items()})
        return adapter

    runner.build_model = keep_initial
    try:
        result = runner.train(config)
    finally:
        runner.build_model = original
    after = load_adapter(result.model_dir).model.state_dict()
    for name, before in captured.items():
        if (
            name.startswith(("vision_tower.", "language_model."))
            and "running_" not in name
            and "num_batches" not in name
        ):
            assert torch.equal(before, after[name]), name
    assert any(not torch.equal(captured[n], after[n]) for n in captured if n.startswith("projector."))
    trainable = json.loads((result.run_dir / "trainable.json").read_text())
    assert all(name.startswith("projector.") for name in trainable["trainable"])


# -- bad input: one line naming the thing and the fix, non-zero exit -----------------------------
def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_missing_config(tmp_path, monkeypatch, capsys):
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, "train", str(tmp_path / "none.yaml"))[::2], "does not exist"
    )


def test_malformed_yaml(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    assert_one_line_error(*run_cli(monkeypatch, capsys, "train", str(path))[::2], "not valid YAML", "line")


def test_unknown_config_key(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, **{"data.shuffle_buffer": 3}))
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, "train", str(path))[::2], "data.shuffle_buffer", "unknown key"
    )


def test_unknown_training_key(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    code, _, err = run_cli(monkeypatch, capsys, "train", str(path), "--set", "training.learning_rat=1")
    assert_one_line_error(code, err, "training.learning_rat", "TrainingArguments")


def test_unknown_data_source(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, **{"data.train": "imagenet:train"}))
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, "train", str(path))[::2], "unknown data source 'imagenet'"
    )


def test_empty_dataset(tmp_path, monkeypatch, capsys):
    (tmp_path / "train.jsonl").write_text("")
    path = write_config(
        tmp_path, tiny_config(tmp_path, **{"data.train": {"source": "jsonl", "path": str(tmp_path)}})
    )
    assert_one_line_error(*run_cli(monkeypatch, capsys, "train", str(path))[::2], "is empty")


def test_not_a_model_folder(tmp_path, monkeypatch, capsys, easyvqa_image):
    code, _, err = run_cli(
        monkeypatch, capsys, "chat", "--model", str(tmp_path), "--image", easyvqa_image, "-q", "hi"
    )
    assert_one_line_error(code, err, "not a model folder")


def test_missing_image_in_chat(tmp_path, tiny_vlm_dir, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "chat",
        "--model",
        str(tiny_vlm_dir),
        "--image",
        str(tmp_path / "x.png"),
        "-q",
        "hi",
    )
    assert_one_line_error(code, err, "x.png", "does not exist")


def test_corrupt_image_in_chat(tmp_path, tiny_vlm_dir, monkeypatch, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli(
        monkeypatch, capsys, "chat", "--model", str(tiny_vlm_dir), "--image", str(bad), "-q", "hi"
    )
    assert_one_line_error(code, err, "bad.png", "corrupt")


def _data_with_a_corrupt_image(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(good)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    lines = [
        {"id": f"ok{i}", "image": "good.png", "question": "what color is the shape?", "answer": "red"}
        for i in range(7)
    ]
    lines.insert(
        3,
        {"id": "broken-one", "image": "broken.png", "question": "what color is the shape?", "answer": "red"},
    )
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return {"source": "jsonl", "path": str(tmp_path)}


def test_corrupt_sample_fails_the_run_by_default(tmp_path, monkeypatch, capsys):
    config = tiny_config(
        tmp_path,
        **{"data.train": _data_with_a_corrupt_image(tmp_path), "training.per_device_train_batch_size": 4},
    )
    code, _, err = run_cli(monkeypatch, capsys, "train", str(write_config(tmp_path, config)))
    assert_one_line_error(code, err, "broken-one", "on_bad_sample: skip")
    assert not (tmp_path / "run" / "model").exists()


def test_corrupt_sample_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    config = tiny_config(
        tmp_path,
        **{
            "data.train": _data_with_a_corrupt_image(tmp_path),
            "data.on_bad_sample": "skip",
            "training.per_device_train_batch_size": 4,
            "training.max_steps": 2,
        },
    )
    code, _, err = run_cli(monkeypatch, capsys, "train", str(write_config(tmp_path, config)))
    assert code == 0, err
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [row["id"] for row in bad] == ["broken-one"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_samples"] == 1


def test_compare_two_evals_from_the_cli(tmp_path, tiny_vlm_dir, monkeypatch, capsys):
    for name in ("a", "b"):
        args = [
            "eval",
            "--model",
            str(tiny_vlm_dir),
            "--data",
            "easyvqa:test",
            "--limit",
            "8",
            "--out",
            str(tmp_path / name),
        ]
        assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert (tmp_path / "a" / "report.html").exists() and (tmp_path / "a" / "report.md").exists()
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "compare",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "cmp"),
    )
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert result["n_shared"] == 8 and result["difference"]["estimate"] == 0.0  # same model, same answers
    assert "0 wrong->right, 0 right->wrong" in out


def test_clip_commands_end_to_end(tmp_path, monkeypatch, capsys):
    """to-shards -> train a tiny CLIP (task: clip) -> zero-shot eval, all through the CLI."""
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "data",
        "to-shards",
        "--data",
        "easyvqa_captions:test",
        "--out",
        str(tmp_path / "shards"),
        "--shard-size",
        "400",
    )
    assert code == 0, err
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3  # 1,000 test images in shards of 400
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "clip_easyvqa.yaml",
        "--set",
        f"output_dir={tmp_path / 'clip'}",
        "--set",
        "training.max_steps=3",
        "--set",
        "training.per_device_train_batch_size=16",
        "--set",
        "zeroshot.tasks=[]",
    )
    assert code == 0, err
    model = tmp_path / "clip" / "model"
    assert (model / "config.json").exists()
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--task",
        "zeroshot",
        "--model",
        str(model),
        "--data",
        "easyvqa_color",
        "--limit",
        "40",
        "--out",
        str(tmp_path / "zs"),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "zs" / "summary.json").read_text())
    assert summary["n"] == 40 and 0.0 <= summary["top1"] <= 1.0


def test_plan_prints_memory_for_a_local_recipe(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    code, out, err = run_cli(monkeypatch, capsys, "plan", str(path), "--gpus", "4", "--strategy", "zero3")
    assert code == 0, err
    assert "GiB" in out or "MiB" in out


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(tmp_path), "--port", "0")
    assert_one_line_error(code, err, "not a model folder")


def test_error_text_with_brackets_reaches_the_user_whole(tmp_path, monkeypatch, capsys):
    """Rich would take `[easyvqa-train-40, ...]` or `stages[what]` for markup and drop it."""
    from vlmkit.errors import ConfigError

    def fail(*args, **kwargs):
        raise ConfigError(
            "loss is nan at step 3 on samples [easyvqa-train-40, easyvqa-train-7]; see stages[what]"
        )

    monkeypatch.setattr(cli, "recipe_path", fail)
    code, _out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "x.yaml"))
    assert code == 2
    assert "[easyvqa-train-40, easyvqa-train-7]" in err and "stages[what]" in err
