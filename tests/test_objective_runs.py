"""`objective: dpo | grpo` end to end through `vlmkit train`, and their bad inputs' one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from test_cli import run_cli, write_config
from vlmkit.config import parse_config
from vlmkit.errors import ConfigError
from vlmkit.train.runner import train

WRONG = {"yes": "no", "no": "yes", "circle": "triangle", "rectangle": "circle", "triangle": "rectangle"}


def preference_file(tmp_path, count: int = 8, **changes) -> str:
    """easy-VQA test questions as preference pairs: the reference answer over a wrong one."""
    from vlmkit.data.sources import load_samples

    lines = []
    for sample in load_samples({"source": "easyvqa", "split": "test", "limit": count}):
        answer = sample.answers[0]
        record = {
            "id": sample.id,
            "image": sample.image,
            "question": sample.question,
            "chosen": answer,
            "rejected": WRONG.get(answer, "red" if answer != "red" else "blue"),
        }
        lines.append(json.dumps({**record, **changes}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def test_dpo_run_logs_rewards_and_margins(tmp_path):
    raw = tiny_config(
        tmp_path,
        **{
            "objective": "dpo",
            "dpo": {"beta": 0.5},
            "freeze.vision": True,  # the ResNet tower's BatchNorm would differ between train and eval mode
            "data.train": {"source": "preference", "path": preference_file(tmp_path)},
            "training.per_device_train_batch_size": 4,
            "training.save_strategy": "no",
        },
    )
    result = train(parse_config(raw))
    logged = [r for r in history(result.run_dir) if "loss" in r]
    assert logged
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in logged[0]
    # the first step starts at the reference (cached log-probs of the same weights): margin 0, loss log 2
    assert abs(logged[0]["rewards/margins"]) < 1e-5
    assert abs(logged[0]["loss"] - 0.6931) < 1e-3
    assert (result.run_dir / "model").is_dir()


def test_sft_then_dpo_with_lora_chains_and_uses_cached_reference(tmp_path):
    stages = [
        {"name": "sft", "data": {"train": {"source": "easyvqa", "split": "train", "limit": 16}}},
        {
            "name": "dpo",
            "objective": "dpo",
            "dpo": {"beta": 0.2},
            "data": {"train": {"source": "preference", "path": preference_file(tmp_path)}},
        },
    ]
    raw = tiny_config(
        tmp_path,
        **{
            "model.lora": {"r": 4, "dropout": 0.0},  # dropout would make policy and reference differ
            "training.per_device_train_batch_size": 4,
            "training.save_strategy": "no",
            "stages": stages,
        },
    )
    config = parse_config(raw)
    assert [s.objective for s in config.resolved_stages()] == ["sft", "dpo"]
    result = train(config)
    assert [s["objective"] for s in result.stages] == ["sft", "dpo"]
    dpo_logs = [r for r in history(result.run_dir / "2-dpo") if "loss" in r]
    # the SFT stage trained the adapter, so the reference is cached log-probs, not the disabled adapter:
    # the DPO stage starts exactly at its reference
    assert abs(dpo_logs[0]["rewards/margins"]) < 1e-5


def test_grpo_run_logs_rewards_spread_and_lengths(tmp_path):
    raw = tiny_config(
        tmp_path,
        **{
            "objective": "grpo",
            "grpo": {
                "num_generations": 3,
                "max_new_tokens": 3,
                "rewards": {"exact_match": 1.0, "vqa_accuracy": 0.5},
                "format": {"pattern": r"\w+", "weight": 0.1},
            },
            "data.train": {"source": "easyvqa", "split": "train", "limit": 8},
            "training.per_device_train_batch_size": 2,
            "training.save_strategy": "no",
        },
    )
    result = train(parse_config(raw))
    logged = [r for r in history(result.run_dir) if "loss" in r]
    assert len(logged) == 2
    for key in (
        "rewards/exact_match/mean",
        "rewards/vqa_accuracy/mean",
        "rewards/format/mean",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
    ):
        assert key in logged[0], key
    assert 0.0 <= logged[0]["frac_reward_zero_std"] <= 1.0
    assert 1.0 <= logged[0]["completions/mean_length"] <= 4.0  # 3 new tokens + end of turn at most


def test_grpo_with_kl_and_fresh_lora_uses_the_disabled_adapter(tmp_path):
    raw = tiny_config(
        tmp_path,
        **{
            "objective": "grpo",
            "model.lora": {"r": 4},
            "grpo": {"num_generations": 2, "max_new_tokens": 2, "beta": 0.1},
            "data.train": {"source": "easyvqa", "split": "train", "limit": 4},
            "training.per_device_train_batch_size": 2,
            "training.max_steps": 1,
            "training.save_strategy": "no",
        },
    )
    result = train(parse_config(raw))
    logged = [r for r in history(result.run_dir) if "loss" in r]
    assert abs(logged[0]["kl"]) < 1e-6  # policy == reference at the first step


# -- bad input (item 8) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rejected": None}, "no 'rejected' answer"),
        ({"chosen": None}, "no 'chosen' answer"),
        ({"chosen": "yes", "rejected": "yes"}, "chosen and rejected are the same answer"),
    ],
)
def test_bad_preference_records_are_one_line_errors(tmp_path, monkeypatch, capsys, changes, message):
    raw = tiny_config(
        tmp_path,
        **{
            "objective": "dpo",
            "data.train": {"source": "preference", "path": preference_file(tmp_path, **changes)},
        },
    )
    code, _, err = run_cli(monkeypatch, capsys, "train", str(write_config(tmp_path, raw)))
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "pairs.jsonl:1" in lines[0], err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"objective": "grpo", "grpo": {"rewards": {"bleu_score": 1.0}}}, "unknown reward 'bleu_score'"),
        ({"objective": "grpo", "grpo": {"num_generations": 1}}, "grpo.num_generations is 1"),
        ({"dpo": {"beta": 0.1}}, "dpo is set but no stage"),
        ({"objective": "grpo", "grpo": {"beta": 0.1}}, "grpo.beta > 0 needs a reference policy"),
        ({"objective": "dpo", "dpo": {"reference": "adapter"}}, "dpo.reference: adapter needs a LoRA model"),
    ],
)
def test_bad_objective_options_are_one_line_errors(tmp_path, monkeypatch, capsys, changes, message):
    raw = tiny_config(tmp_path, **changes)
    if raw.get("objective") == "dpo":
        raw["data"]["train"] = {"source": "preference", "path": preference_file(tmp_path)}
    code, _, err = run_cli(monkeypatch, capsys, "train", str(write_config(tmp_path, raw)))
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_grpo_source_without_reference_answers_names_the_sample(tmp_path, monkeypatch, capsys):
    path = tmp_path / "prompts.jsonl"
    image = preference_file(tmp_path, 1)
    with open(image) as handle:
        record = json.loads(handle.readline())
    path.write_text(json.dumps({"id": "q7", "image": record["image"], "question": "what shape?"}) + "\n")
    raw = tiny_config(tmp_path, **{"objective": "grpo", "data.train": {"source": "jsonl", "path": str(path)}})
    code, _, err = run_cli(monkeypatch, capsys, "train", str(write_config(tmp_path, raw)))
    assert code != 0
    assert "sample 'q7'" in err and "no reference answers" in err, err


def test_dpo_on_a_source_without_pairs_names_the_sample(tmp_path):
    raw = tiny_config(tmp_path, **{"objective": "dpo", "training.save_strategy": "no"})
    with pytest.raises(Exception, match=r"sample 'easyvqa-train-0' has no rejected answer"):
        train(parse_config(raw))


def test_stage_options_for_another_objective_are_refused(tmp_path):
    stages = [{"name": "a", "grpo": {"num_generations": 4}}]
    with pytest.raises(ConfigError, match=r"stages\[a\]\.grpo is set but"):
        from vlmkit.config import RunConfig, validate

        validate(RunConfig, tiny_config(tmp_path, stages=stages), "config", "docs/recipes.md")


@pytest.mark.parametrize("name", ["easyvqa_dpo.yaml", "easyvqa_grpo.yaml"])
def test_shipped_easyvqa_recipes_parse_and_train_two_steps(tmp_path, tiny_vlm_dir, name):
    from importlib.resources import files

    from vlmkit.config import read_yaml

    raw = read_yaml((files("vlmkit") / "configs" / name).read_text())
    assert parse_config(raw).objective == name.split("_")[1].removesuffix(".yaml")
    raw["model"]["pretrained"] = str(tiny_vlm_dir)
    raw["output_dir"] = str(tmp_path / "run")
    raw["training"].update(max_steps=2, per_device_train_batch_size=2, logging_steps=1)
    raw["training"].pop("num_train_epochs", None)
    raw["data"]["train"] = (
        {"source": "preference", "path": preference_file(tmp_path)}
        if raw["objective"] == "dpo"
        else {"source": "easyvqa", "split": "train", "limit": 4}
    )
    raw["data"]["eval"]["limit"] = 4
    result = train(parse_config(raw))
    assert result.stages[0]["global_step"] == 2 and result.eval_summary["n"] == 4


def test_mistake_pairs_pair_wrong_answers_with_the_reference(tiny_vlm_dir, easyvqa_samples):
    from vlmkit.models.adapters import load_adapter
    from vlmkit.train.objectives.pairs import mistake_pairs

    adapter = load_adapter(tiny_vlm_dir)
    records = mistake_pairs(adapter, easyvqa_samples[:16], max_new_tokens=3)
    assert records  # a random model is mostly wrong
    for record in records:
        assert record["rejected"] != record["chosen"] and record["chosen"] in record["answers"]


def test_sampled_mistake_pairs_take_the_most_frequent_wrong_answer(
    tiny_vlm_dir, easyvqa_samples, monkeypatch
):
    """With `num_samples`, a question answered right greedily still gets a pair when a sampled
    answer is wrong; the rejected answer is the most frequent wrong one."""
    from vlmkit.models.adapters import load_adapter
    from vlmkit.train.objectives.pairs import mistake_pairs

    adapter = load_adapter(tiny_vlm_dir)
    samples = easyvqa_samples[:2]
    right, other = samples[0].answers[0], "purple"
    draws = iter([[right, right], [other, right], [other, "teal"], ["teal", right]])
    calls = []

    def scripted(batch, **kwargs):
        calls.append(kwargs)
        return next(draws)

    monkeypatch.setattr(adapter, "generate", scripted)
    records = mistake_pairs(adapter, samples, max_new_tokens=3, num_samples=3, temperature=2.0)
    assert [call.get("do_sample", False) for call in calls] == [False, True, True, True]
    assert {call.get("temperature") for call in calls[1:]} == {2.0}
    assert len({call["seed"] for call in calls[1:]}) == 3  # each draw its own seed
    by_id = {r["id"]: r for r in records}
    assert by_id[samples[0].id]["rejected"] == other  # greedy was right; 2 of 3 draws said purple
    second = samples[1]
    wrong = [a for a in (right, right, "teal", right) if a != second.answers[0]]
    assert by_id[second.id]["rejected"] == max(wrong, key=wrong.count)
    assert all(r["rejected"] not in r["answers"] for r in records)


def test_ranked_mistake_pairs_reject_the_highest_ranked_wrong_answer(
    tiny_vlm_dir, easyvqa_samples, monkeypatch
):
    """With `num_beams`, the rejected answer is the first wrong one in the model's ranking (not the
    most frequent), and a question the model answers right still gets its strongest rival."""
    from vlmkit.models.adapters import load_adapter
    from vlmkit.train.objectives.pairs import mistake_pairs

    adapter = load_adapter(tiny_vlm_dir)
    samples = easyvqa_samples[:2]
    right = samples[0].answers[0]
    second_right = samples[1].answers[0]
    calls = []

    def scripted(batch, **kwargs):
        calls.append(kwargs)
        first_ranked = [right, "teal", "purple", "purple"]  # right, then its strongest rival
        return [*first_ranked, "teal", second_right, "purple", "purple"]

    monkeypatch.setattr(adapter, "generate", scripted)
    records = mistake_pairs(adapter, samples, max_new_tokens=3, num_beams=4)
    assert len(calls) == 1
    options = calls[0]["generation_options"]
    assert options["num_beams"] == 4 and options["num_return_sequences"] == 4
    assert options["length_penalty"] == 0.0  # ranked by summed log-probability
    assert [r["rejected"] for r in records] == ["teal", "teal"]
    with pytest.raises(ValueError, match="not both"):
        mistake_pairs(adapter, samples, num_beams=4, num_samples=2)


def test_ranked_answers_of_a_real_model_come_sample_by_sample(tiny_vlm_dir, easyvqa_samples):
    """Beam search through the adapter returns k answers per sample, in sample order: a batch of
    three gives what each sample gives alone."""
    from vlmkit.models.adapters import load_adapter
    from vlmkit.train.objectives.pairs import ranked_answers

    adapter = load_adapter(tiny_vlm_dir)
    samples = easyvqa_samples[:3]
    together = ranked_answers(adapter, samples, 3, max_new_tokens=2)
    assert [len(options) for options in together] == [3, 3, 3]
    alone = [ranked_answers(adapter, [sample], 3, max_new_tokens=2)[0] for sample in samples]
    assert together == alone
    assert len({tuple(options) for options in together}) > 1 or len(set(together[0])) > 1


def test_pairs_cli_refuses_beams_with_samples(tiny_vlm_dir, tmp_path, capsys):
    from vlmkit.train.objectives.pairs import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_vlm_dir), str(tmp_path / "p.jsonl"), "--beams", "4", "--samples", "2"])
    assert exit_info.value.code == 2
    assert "choose one" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
