"""VlmkitLMMS against lmms-eval's request interface, with Instance-shaped fake requests, and
lmms-eval's own CLI end to end (`make install` installs lmms-eval --no-deps plus the `lmms` extra;
those tests skip only where lmms-eval is absent).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationMixin

from vlmkit.data.images import load_image
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval import lmms as lmms_module
from vlmkit.eval.lmms import VlmkitLMMS, continuation_logprob

TASK, SPLIT = "tiny_vqa", "test"


@dataclass
class FakeInstance:
    """The parts of lmms_eval.api.instance.Instance a model reads."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict[str, Any] = field(default_factory=lambda: {"task": TASK, "doc_id": 0, "repeats": 1})

    @property
    def args(self) -> tuple:
        return self.arguments


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def gen_request(doc_id: int, context: str, **gen_kwargs: Any) -> FakeInstance:
    return FakeInstance("generate_until", (context, gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT))


def ll_request(doc_id: int, context: str, continuation: Any) -> FakeInstance:
    return FakeInstance("loglikelihood", (context, continuation, doc_to_visual, doc_id, TASK, SPLIT))


@pytest.fixture(scope="module")
def lm(tiny_vlm_dir: Path, easyvqa_samples: list[Sample]) -> VlmkitLMMS:
    model = VlmkitLMMS(pretrained=str(tiny_vlm_dir), device="cpu", batch_size="2", max_new_tokens=4)
    docs = [
        {"image": load_image(s.image), "question": s.question, "answer": s.answers[0]}
        for s in easyvqa_samples[:4]
    ]
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def loglikelihoods(lm: VlmkitLMMS, requests: list[FakeInstance]) -> list[tuple[float, bool]]:
    """lm.loglikelihood's tuples (unwrapped from GenerationResult where lmms-eval 0.7 needs that)."""
    return [getattr(result, "text", result) for result in lm.loglikelihood(requests)]


def direct_sample(lm: VlmkitLMMS, doc_id: int, context: str) -> Sample:
    doc = lm.task_dict[TASK][SPLIT][doc_id]
    return Sample(id=str(doc_id), image=doc["image"], messages=[{"role": "user", "content": context}])


def test_generate_until_matches_adapter_and_keeps_order(lm: VlmkitLMMS) -> None:
    docs = lm.task_dict[TASK][SPLIT]
    requests = [gen_request(i, d["question"], max_new_tokens=3 if i % 2 else 1) for i, d in enumerate(docs)]
    outputs = lm.generate_until(requests)
    assert len(outputs) == len(docs)
    for i, doc in enumerate(docs):
        expected = lm.adapter.generate(
            [direct_sample(lm, i, doc["question"])], max_new_tokens=3 if i % 2 else 1
        )[0]
        assert outputs[i] == expected
        assert len(outputs[i].split()) <= (3 if i % 2 else 1)


def test_generate_until_honours_until(lm: VlmkitLMMS) -> None:
    question = lm.task_dict[TASK][SPLIT][0]["question"]
    full = lm.generate_until([gen_request(0, question, max_new_tokens=4)])[0]
    words = full.split()
    assert len(words) >= 2, "the tiny model should produce a few words to cut"
    cut = lm.generate_until([gen_request(0, question, max_new_tokens=4, until=[" " + words[1]])])[0]
    assert cut == words[0]


def test_loglikelihood_equals_loss_times_tokens(lm: VlmkitLMMS) -> None:
    """Two independent paths: logits of an unlabelled forward vs the model's own summed loss.

    lmms-eval's multiple-choice scorer takes np.argmin, so the value returned is -log P (> 0)."""
    doc = lm.task_dict[TASK][SPLIT][1]
    [(negative, _)] = loglikelihoods(lm, [ll_request(1, doc["question"], doc["answer"])])
    assert lmms_module.loglikelihood_convention() == "negative_logprob"
    logprob = -negative
    sample = Sample(
        id="x",
        image=doc["image"],
        messages=[
            {"role": "user", "content": doc["question"]},
            {"role": "assistant", "content": doc["answer"]},
        ],
    )
    batch = lm.adapter.encode([sample], train=True)
    labels = batch["labels"]
    for stop in lm.adapter.stop_token_ids():  # the end-of-turn token is not part of the continuation
        labels[labels == stop] = -100
    count = int((labels[:, 1:] != -100).sum())
    assert count >= 1
    with torch.inference_mode():
        loss = lm.adapter.model(**batch).loss
    assert logprob < 0
    assert logprob == pytest.approx(-float(loss) * count, rel=1e-4)


def test_loglikelihood_greedy_flag(lm: VlmkitLMMS) -> None:
    doc = lm.task_dict[TASK][SPLIT][2]
    greedy_text = lm.adapter.generate([direct_sample(lm, 2, doc["question"])], max_new_tokens=2)[0]
    assert greedy_text, "the tiny model should generate something"
    vocab = ["red", "green", "blue", "circle", "triangle", "yes", "no"]
    other = next(word for word in vocab if word != greedy_text.split()[0])
    (lp_greedy, is_greedy), (lp_other, not_greedy) = loglikelihoods(
        lm, [ll_request(2, doc["question"], greedy_text), ll_request(2, doc["question"], other)]
    )
    assert is_greedy is True
    assert not_greedy is False
    assert lp_greedy >= 0 and lp_other > 0  # -log P


def test_loglikelihood_callable_target_and_direct_helper(lm: VlmkitLMMS) -> None:
    doc = lm.task_dict[TASK][SPLIT][0]
    via_callable = loglikelihoods(lm, [ll_request(0, doc["question"], lambda d: d["answer"])])[0]
    sample = Sample(
        id="y",
        image=doc["image"],
        messages=[
            {"role": "user", "content": doc["question"]},
            {"role": "assistant", "content": doc["answer"]},
        ],
    )
    logprob, greedy = continuation_logprob(lm.adapter, sample)
    assert via_callable == (-logprob, greedy)


def test_loglikelihood_without_image_is_a_clear_error(lm: VlmkitLMMS) -> None:
    with pytest.raises(DataError, match="acc_mutual_info"):
        lm.loglikelihood([FakeInstance("loglikelihood", ("", " red"))])


def test_multi_round_feeds_previous_outputs(lm: VlmkitLMMS) -> None:
    seen: list[dict[str, Any]] = []

    def doc_to_text(
        doc: dict[str, Any], previous_output: list[str], round_idx: int, previous_round_info: Any
    ):
        seen.append({"previous": list(previous_output), "round": round_idx, "info": previous_round_info})
        terminal = round_idx >= 2
        return (
            [doc["image"]],
            f"round {round_idx}: {doc['question']}",
            terminal,
            previous_output,
            {"n": round_idx},
        )

    question = lm.task_dict[TASK][SPLIT][0]["question"]
    request = FakeInstance(
        "generate_until_multi_round",
        (question, {"max_new_tokens": 2}, doc_to_visual, doc_to_text, 0, TASK, SPLIT),
    )
    [outputs] = lm.generate_until_multi_round([request])
    assert len(outputs) == 2  # rounds 0 and 1; doc_to_text ends it at round 2
    assert [call["round"] for call in seen] == [1, 2]
    assert seen[0]["previous"] == outputs[:1] and seen[1]["previous"] == outputs
    assert seen[1]["info"] == {"n": 1}
    assert outputs[0] == lm.generate_until([gen_request(0, question, max_new_tokens=2)])[0]


def test_request_errors_are_one_line(lm: VlmkitLMMS) -> None:
    with pytest.raises(DataError, match="not in task_dict"):
        lm.generate_until([gen_request(99, "q")])

    def two_images(doc: dict[str, Any]) -> list[Any]:
        return [doc["image"], doc["image"]]

    with pytest.raises(DataError, match="2 images"):
        lm.generate_until([FakeInstance("generate_until", ("q", {}, two_images, 0, TASK, SPLIT))])


def test_model_args_are_checked(lm: VlmkitLMMS) -> None:
    with pytest.raises(ConfigError, match="unknown vlmkit model_args: temperature"):
        VlmkitLMMS(adapter=lm.adapter, temperature=0.2)
    with pytest.raises(ConfigError, match="pretrained=DIR"):
        VlmkitLMMS()
    with pytest.raises(ConfigError, match="batch_size"):
        VlmkitLMMS(adapter=lm.adapter, batch_size="many")
    assert VlmkitLMMS(adapter=lm.adapter, batch_size="auto").batch_size == 1


def test_generation_options_map_lmms_kwargs(lm: VlmkitLMMS) -> None:
    greedy = lm._generation_options(
        {"until": "\n", "temperature": 0, "do_sample": False, "max_new_tokens": 7}
    )
    assert greedy == {
        "max_new_tokens": 7,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "stop": ["\n"],
    }
    sampled = lm._generation_options({"temperature": 0.7, "top_p": 0.9})
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert lm._generation_options({})["max_new_tokens"] == lm.max_new_tokens


def test_num_beams_runs_the_models_beam_search(lm: VlmkitLMMS) -> None:
    """num_beams > 1 is honoured: the answer is the best beam of the model's own beam search."""
    options = lm._generation_options({"num_beams": 3, "max_new_tokens": 4})
    assert options["generation_options"] == {"num_beams": 3, "num_return_sequences": 1}
    with pytest.raises(ConfigError, match="num_beams=0"):
        lm._generation_options({"num_beams": 0})
    doc = lm.task_dict[TASK][SPLIT][0]
    (answer,) = lm.generate_until([gen_request(0, doc["question"], num_beams=3, max_new_tokens=4)])
    adapter = lm.adapter
    batch = adapter.encode([direct_sample(lm, 0, doc["question"])], train=False)
    config = adapter.generation_config(max_new_tokens=4, do_sample=False, num_beams=3)
    seen: list[int] = []
    original = GenerationMixin._beam_search

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["generation_config"].num_beams if "generation_config" in kwargs else -1)
        return original(self, *args, **kwargs)

    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(GenerationMixin, "_beam_search", spy)
        again = lm.generate_until([gen_request(0, doc["question"], num_beams=3, max_new_tokens=4)])
        assert seen, "generate_until(num_beams=3) did not run beam search"
        output = adapter.model.generate(**batch, generation_config=config)
    if adapter.generate_returns_prompt:
        output = output[:, batch["input_ids"].shape[1] :]
    expected = adapter.tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
    assert answer == again[0] == expected


def test_module_imports_without_lmms_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh copy of the module with lmms_eval blocked falls back to the shim base class."""
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    for name in [m for m in sys.modules if m.startswith("lmms_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location("_lmms_shim_copy", lmms_module.__file__)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAVE_LMMS_EVAL is False
    base = module.VlmkitLMMS.__mro__[1]
    assert base.__module__ == "_lmms_shim_copy"
    with pytest.raises(ConfigError, match="lmms-eval is not installed"):
        module.register_with_lmms_eval()


def test_registration_with_installed_lmms_eval(tiny_vlm_dir: Path) -> None:
    pytest.importorskip("lmms_eval.api.model")
    registry = pytest.importorskip("lmms_eval.api.registry")
    from lmms_eval.api.model import lmms

    assert issubclass(VlmkitLMMS, lmms)
    assert registry.MODEL_REGISTRY["vlmkit"] is VlmkitLMMS
    models = pytest.importorskip("lmms_eval.models")
    lmms_module.register_with_lmms_eval()
    assert models.get_model("vlmkit") is VlmkitLMMS
    built = VlmkitLMMS.create_from_arg_string(f"pretrained={tiny_vlm_dir},device=cpu", {"batch_size": 2})
    assert built.batch_size == 2


def test_loglikelihood_survives_lmms_eval_unwrapping(lm: VlmkitLMMS) -> None:
    instance = pytest.importorskip("lmms_eval.api.instance")
    doc = lm.task_dict[TASK][SPLIT][0]
    [raw] = lm.loglikelihood([ll_request(0, doc["question"], doc["answer"])])
    stored, _ = instance.unwrap_generation_output(raw)  # what lmms-eval's evaluator keeps
    negative_logprob, greedy = stored
    assert isinstance(negative_logprob, float) and negative_logprob > 0 and isinstance(greedy, bool)


TASK_YAML = """
task: vlmkit_tiny_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: {target}
{extra}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """
from PIL import Image

CHOICES = ["red", "green", "blue", "black", "gray", "yellow", "teal", "brown",
           "circle", "rectangle", "triangle", "yes", "no"]


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return CHOICES


def doc_to_target_index(doc):
    return CHOICES.index(doc["answer"])


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


@pytest.mark.slow
def test_end_to_end_lmms_eval(tiny_vlm_dir: Path, easyvqa_samples: list[Sample], tmp_path: Path) -> None:
    """lmms-eval's own evaluator on two local tasks: generate_until and multiple_choice."""
    pytest.importorskip("lmms_eval.evaluator")
    import json

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    rows = [
        {"question": s.question, "answer": s.answers[0], "image_path": str(s.image)}
        for s in easyvqa_samples[:4]
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "utils.py").write_text(TASK_UTILS)
    gen_extra = "generation_kwargs:\n  max_new_tokens: 3\nprocess_results: !function utils.process_results"
    (tmp_path / "gen.yaml").write_text(
        TASK_YAML.format(
            kind="gen",
            data=data,
            output_type="generate_until",
            target="answer",
            extra=gen_extra,
            metric="exact_match",
        )
    )
    mc_extra = "doc_to_choice: !function utils.doc_to_choice"
    (tmp_path / "mc.yaml").write_text(
        TASK_YAML.format(
            kind="mc",
            data=data,
            output_type="multiple_choice",
            target="!function utils.doc_to_target_index",
            extra=mc_extra,
            metric="acc",
        )
    )
    lmms_module.register_with_lmms_eval()
    results = simple_evaluate(
        model="vlmkit",
        model_args=f"pretrained={tiny_vlm_dir},device=cpu",
        tasks=["vlmkit_tiny_gen", "vlmkit_tiny_mc"],
        task_manager=TaskManager("WARNING", include_path=str(tmp_path)),
        batch_size=2,
        log_samples=True,
    )
    assert 0.0 <= results["results"]["vlmkit_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["results"]["vlmkit_tiny_mc"]["acc,none"] <= 1.0
    choice_scores = results["samples"]["vlmkit_tiny_mc"][0]["filtered_resps"]
    assert len(choice_scores) == 13 and all(isinstance(ll, float) and ll > 0 for ll, _ in choice_scores)


def test_loglikelihood_convention_matches_installed_scorer() -> None:
    """lmms-eval <= 0.7.3 picks multiple-choice answers with np.argmin: we must return -log P."""
    pytest.importorskip("lmms_eval.api.task")
    assert lmms_module.loglikelihood_convention() == "negative_logprob"


def test_lmms_eval_cli_end_to_end(tiny_vlm_dir: Path, easyvqa_samples: list[Sample], tmp_path: Path) -> None:
    """lmms-eval's own command line, `--model vlmkit` through the entry point, on two local tasks.

    Each multiple-choice doc's gold answer is set to the choice vlmkit's log-probs rank first, so
    the accuracy lmms-eval reports must be exactly 1.0 (taking the argmin of log-probs, the bug
    this guards against, gives ~0), and every pick lmms-eval made must be that argmax.
    """
    pytest.importorskip("lmms_eval.__main__")
    import json
    import os
    import subprocess

    choices = TASK_UTILS.split("CHOICES = ")[1].split("]")[0] + "]"
    choices_list = [
        c.strip().strip('"') for c in choices.strip("[]").replace("\n", " ").split(",") if c.strip()
    ]
    adapter = VlmkitLMMS(pretrained=str(tiny_vlm_dir), device="cpu").adapter
    rows, best = [], []
    for sample in easyvqa_samples[:3]:
        image = load_image(sample.image)
        scores = [
            continuation_logprob(
                adapter,
                Sample(
                    id=sample.id,
                    image=image,
                    messages=[
                        {"role": "user", "content": sample.question},
                        {"role": "assistant", "content": choice},
                    ],
                ),
            )[0]
            for choice in choices_list
        ]
        top = max(range(len(scores)), key=scores.__getitem__)
        best.append(top)
        rows.append(
            {"question": sample.question, "answer": choices_list[top], "image_path": str(sample.image)}
        )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "utils.py").write_text(TASK_UTILS)
    gen_extra = "generation_kwargs:\n  max_new_tokens: 3\nprocess_results: !function utils.process_results"
    (tmp_path / "gen.yaml").write_text(
        TASK_YAML.format(
            kind="gen",
            data=data,
            output_type="generate_until",
            target="answer",
            extra=gen_extra,
            metric="exact_match",
        )
    )
    (tmp_path / "mc.yaml").write_text(
        TASK_YAML.format(
            kind="mc",
            data=data,
            output_type="multiple_choice",
            target="!function utils.doc_to_target_index",
            extra="doc_to_choice: !function utils.doc_to_choice",
            metric="acc",
        )
    )
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "vlmkit",
        "--model_args", f"pretrained={tiny_vlm_dir},device=cpu",
        "--tasks", "vlmkit_tiny_gen,vlmkit_tiny_mc", "--include_path", str(tmp_path),
        "--batch_size", "2", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, (sorted(map(str, out.rglob("*"))), done.stdout[-2000:], done.stderr[-4000:])
    [results_file] = found
    results = json.loads(results_file.read_text())["results"]
    assert results["vlmkit_tiny_mc"]["acc,none"] == 1.0
    assert 0.0 <= results["vlmkit_tiny_gen"]["exact_match,none"] <= 1.0
    [samples_file] = [p for p in out.rglob("*_samples_vlmkit_tiny_mc.jsonl")]
    logged = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    assert len(logged) == len(rows)
    for entry in logged:
        values = [float(resp[0]) for resp in entry["filtered_resps"]]
        assert all(value > 0 for value in values)  # -log P, what lmms-eval's argmin expects
        assert min(range(len(values)), key=values.__getitem__) == best[entry["doc_id"]]
