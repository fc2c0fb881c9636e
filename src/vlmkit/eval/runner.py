"""The eval loop: batched greedy generation, resumable per-sample JSONL, summary JSON.

A restarted run skips the sample ids already in its predictions.jsonl, so a long evaluation
that dies loses at most one batch. The folder's fingerprint.json (model content hash, data spec,
prompt suffix, generation settings, metric, vlmkit version) guards that: predictions made by a
different run are never mixed in; the restart refuses in one line (`fresh=True` starts over).
A sample without reference answers is predicted but never scored (test splits); `rescore`
re-scores stored predictions with another metric without generating.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from vlmkit.data.sample import Sample
from vlmkit.data.sources import DataSpec, eval_defaults, is_streamed, iter_samples, load_samples
from vlmkit.errors import ConfigError, DataError, SampleError
from vlmkit.eval.metrics import CORPUS_METRICS, aggregation_of, get_metric, group_score
from vlmkit.eval.options import check_eval_options
from vlmkit.eval.provenance import digest, environment, model_fingerprint, module_fingerprint
from vlmkit.eval.report import CATEGORY_KEYS, CORRECT_THRESHOLD
from vlmkit.models.adapters.base import ModelAdapter

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
BAD_SAMPLES_FILE = "bad_samples.jsonl"
#: Keys of fingerprint.json that must match for a restart to reuse predictions.
FINGERPRINT_KEYS = ("model", "data", "prompt_suffix", "max_new_tokens", "do_sample", "metric", "vlmkit")
#: Official submission formats: source -> (file name, id key in the file, meta key holding it).
SUBMISSION_FORMATS = {
    "vqav2": ("vqav2_{split}_results.json", "question_id", "question_id"),
    "docvqa": ("docvqa_{split}_submission.json", "questionId", "questionId"),
}
MAX_LISTED_BAD = 100
GALLERY_IMAGES = 256  # embedded images of wrong answers kept per eval folder, for the report


def with_prompt_suffix(sample: Sample, suffix: str) -> Sample:
    """Append a task instruction to the last user turn (e.g. "Answer with a single word.")."""
    if not suffix:
        return sample
    messages = [dict(m) for m in sample.prompt_messages()]
    messages[-1]["content"] = f"{messages[-1]['content']}{suffix}"
    return dataclasses.replace(sample, messages=messages)


def read_done(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: it and what follows are redone
    return rows


def is_scored(row: dict[str, Any]) -> bool:
    """Rows of samples without reference answers carry `score: null` and are left out of scores."""
    return row.get("score") is not None


def breakdown(rows: list[dict[str, Any]], key: str, metric: str) -> dict[str, dict[str, float]]:
    """Per meta[key] group: score (as the headline is computed) and n, over scored rows."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        value = (row.get("meta") or {}).get(key)
        if value is not None and is_scored(row):
            groups[str(value)].append(row)
    return {
        name: {"score": _score(metric, members), "n": len(members)}
        for name, members in sorted(groups.items())
    }


def _breakdowns(rows: list[dict[str, Any]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """by_question_type and by_answer_type always (empty when the data has none); the others
    (ChartQA's by_human_or_machine) only where the data carries them."""
    out = {f"by_{key}": breakdown(rows, key, metric) for key in CATEGORY_KEYS}
    return {k: v for k, v in out.items() if v or k in ("by_question_type", "by_answer_type")}


def _score(metric: str, rows: list[dict[str, Any]]) -> float:
    return group_score(
        metric, [r["prediction"] for r in rows], [r["answers"] for r in rows], [r["score"] for r in rows]
    )


def _data_identity(data: DataSpec | list[Sample]) -> dict[str, Any]:
    if isinstance(data, DataSpec):
        return data.model_dump(mode="json", exclude={"limit"})
    return {"samples": digest([[s.id, s.question, s.answers] for s in data])}


def _model_identity(adapter: ModelAdapter, model_dir: Path | None) -> str:
    if model_dir is not None and model_dir.is_dir():
        return model_fingerprint(model_dir)
    return module_fingerprint(adapter.model)


def _check_fingerprint(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    path = out_dir / FINGERPRINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"{out_dir} holds predictions without a {FINGERPRINT_FILE} (an older or foreign eval); "
            "pass --fresh to start over there, or choose another --out"
        )
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON; pass --fresh to start over") from None
    differ = [key for key in FINGERPRINT_KEYS if stored.get(key) != fingerprint.get(key)]
    if not differ:
        return
    hint = "pass --fresh to start over there, or choose another --out"
    if differ == ["metric"]:
        hint = (
            f"run `vlmkit rescore {out_dir} --metric {fingerprint['metric']}` to re-score them, "
            "or pass --fresh"
        )
    details = "; ".join(f"{key}: {stored.get(key)!r} -> {fingerprint.get(key)!r}" for key in differ)
    raise ConfigError(f"{out_dir} holds predictions of a different eval ({details}); {hint}")


def build_summary(
    rows: list[dict[str, Any]],
    metric: str,
    base: dict[str, Any],
) -> dict[str, Any]:
    """summary.json from prediction rows: headline, interval and groups all computed one way."""
    from vlmkit.eval.report import Scoring, scoring_for, to_record

    scored = [row for row in rows if is_scored(row)]
    notes = list(base.pop("notes", []))
    summary: dict[str, Any] = {"metric": metric, "aggregation": aggregation_of(metric)}
    if scored:
        scoring: Scoring = scoring_for(metric, [to_record(row) for row in scored])
        interval = scoring.interval()
        summary["score"] = _score(metric, scored)
        summary["interval"] = interval.to_dict()
    else:
        summary["score"] = None
        summary["interval"] = None
        notes.append(
            "no sample has a reference answer: predictions only, nothing scored "
            "(submit the predictions or the submission file to the benchmark's server)"
        )
    unscored = len(rows) - len(scored)
    if scored and unscored:
        notes.append(f"{unscored} of {len(rows)} samples have no reference answer and are not scored")
    if metric in CORPUS_METRICS and scored and all(len(r["prediction"].split()) < 4 for r in scored):
        notes.append(
            f"every prediction is shorter than 4 words, so corpus BLEU-4 ({metric}) is 0 by "
            "definition; use helm_bleu_1, quasi_exact_match or exact_match for short answers"
        )
    if metric.startswith("helm_bleu"):
        from vlmkit.eval.metrics import HELM_TOKENIZER

        mode = HELM_TOKENIZER.get("mode")
        if mode == "treebank":
            notes.append("nltk punkt_tab data absent: HELM BLEU tokenized without sentence splitting")
    summary.update(
        {
            "n": len(scored),
            "n_unscored": unscored,
            "n_predictions": len(rows),
            **base,
            **_breakdowns(rows, metric),
            "notes": notes,
        }
    )
    return summary


def _write_submission(
    out_dir: Path, source: str | None, split: str, rows: list[dict[str, Any]]
) -> str | None:
    """The official results file for a test split (VQAv2 server, DocVQA RRC), else nothing."""
    if source not in SUBMISSION_FORMATS or "test" not in split.lower():
        return None
    filename, file_key, meta_key = SUBMISSION_FORMATS[source]
    entries = []
    for row in rows:
        value = (row.get("meta") or {}).get(meta_key)
        if value is None:
            value = str(row["id"]).rsplit("-", 1)[-1]
        try:
            question_id: int | str = int(value)
        except (TypeError, ValueError):
            question_id = str(value)
        entries.append({file_key: question_id, "answer": row["prediction"]})
    name = filename.format(split=split)
    (out_dir / name).write_text(json.dumps(entries))
    return name


def _image_reference(sample: Sample, score: float | None, out_dir: Path, kept: list[int]) -> str | None:
    """The image's path for the report's gallery. Images embedded in the data (parquet / arrow
    bytes, PIL objects) have no path: the image of a wrong answer (the gallery's cards) is kept
    as a small JPEG under `images/` in the eval folder, at most GALLERY_IMAGES per folder
    (`kept[0]` counts them)."""
    if isinstance(sample.image, (str, Path)):
        return str(sample.image)
    if sample.image is None or score is None or score >= CORRECT_THRESHOLD:
        return None
    from vlmkit.data.images import load_image

    if kept[0] >= GALLERY_IMAGES:
        return None
    kept[0] += 1
    (out_dir / "images").mkdir(exist_ok=True)
    name = f"images/{digest(sample.id)[:16]}.jpg"
    image = load_image(sample.image).copy()
    image.thumbnail((320, 320))
    image.convert("RGB").save(out_dir / name, format="JPEG", quality=85)
    return name


def _first_checked(stream: Iterator[Sample]) -> Iterator[Sample]:
    """`stream` with its first sample read now, so that a missing or empty source fails before
    the eval folder is touched."""
    first = next(stream, None)
    return iter(()) if first is None else itertools.chain([first], stream)


def _bad_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def _generate_batch(
    adapter: ModelAdapter,
    batch: list[Sample],
    prompt_suffix: str,
    max_new_tokens: int,
    on_bad_sample: Literal["skip", "fail"],
    bad_path: Path,
) -> list[tuple[Sample, str]]:
    """Answers for a batch; a bad sample fails the run or (skip) is logged once and left out."""
    prompts = [with_prompt_suffix(s, prompt_suffix) for s in batch]
    try:
        return list(zip(batch, adapter.generate(prompts, max_new_tokens=max_new_tokens), strict=True))
    except SampleError as error:
        if on_bad_sample == "fail":
            raise DataError(
                f"{error} (or pass --on-bad-sample skip to skip and count such samples)"
            ) from None
    out = []
    for sample, prompt in zip(batch, prompts, strict=True):
        try:
            [answer] = adapter.generate([prompt], max_new_tokens=max_new_tokens)
        except SampleError as error:
            logger.warning("skipping %s", error)
            with bad_path.open("a") as handle:
                handle.write(json.dumps({"id": error.sample_id, "reason": error.reason}) + "\n")
        else:
            out.append((sample, answer))
    return out


def evaluate(
    adapter: ModelAdapter,
    data: DataSpec | str | list[Sample],
    out_dir: Path,
    *,
    metric: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    prompt_suffix: str | None = None,
    limit: int | None = None,
    resume: bool = True,
    model_name: str = "",
    model_dir: Path | None = None,
    command: str | None = None,
    report: bool = True,
    on_bad_sample: Literal["skip", "fail"] = "fail",
    on_mismatch: Literal["refuse", "restart"] = "refuse",
) -> dict[str, Any]:
    """Score `adapter` on `data`; writes predictions.jsonl, summary.json and fingerprint.json.

    Unset `metric`, `prompt_suffix` and `max_new_tokens` take the source's defaults (e.g. VQAv2:
    vqa_accuracy and "Answer the question using a single word or phrase."). `model_dir` (default:
    `model_name` when it is a folder) is fingerprinted by content. `on_mismatch="restart"` starts
    over, with a warning, instead of refusing when out_dir holds another eval's predictions.
    """
    check_eval_options(metric, batch_size, limit, max_new_tokens, on_bad_sample)
    samples: Iterable[Sample]
    if isinstance(data, list):
        samples, data_name, source, split, spec = data, "samples", None, "", data
    else:
        parsed = data if isinstance(data, DataSpec) else DataSpec.model_validate(data)
        # Shards are streamed a batch at a time (a LAION-sized folder never sits in memory).
        samples = _first_checked(iter_samples(parsed)) if is_streamed(parsed) else load_samples(parsed)
        data_name, source, split, spec = str(parsed), parsed.source, parsed.split, parsed
    if limit is not None:
        samples = samples[:limit] if isinstance(samples, list) else itertools.islice(samples, limit)
    defaults = eval_defaults(source)  # per-source metric, instruction and answer budget
    metric_name = metric or defaults["metric"]
    prompt_suffix = defaults["prompt_suffix"] if prompt_suffix is None else prompt_suffix
    max_new_tokens = max_new_tokens or defaults["max_new_tokens"]
    score_fn = get_metric(metric_name)
    if model_dir is None and model_name and Path(model_name).is_dir():
        model_dir = Path(model_name)
    import vlmkit

    fingerprint = {
        "model": _model_identity(adapter, model_dir),
        "data": _data_identity(spec),
        "prompt_suffix": prompt_suffix,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "metric": metric_name,
        "vlmkit": vlmkit.__version__,
    }
    predictions_path = out_dir / "predictions.jsonl"
    bad_path = out_dir / BAD_SAMPLES_FILE
    done = read_done(predictions_path) if resume else []
    if done:
        try:
            _check_fingerprint(out_dir, fingerprint)
        except ConfigError as error:
            if on_mismatch == "refuse":
                raise
            logger.warning("%s; starting over", str(error).split("; ")[0])
            done = []
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not done:
        for stale in (predictions_path, bad_path, out_dir / "summary.json"):
            stale.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "images", ignore_errors=True)  # the gallery's images of that run
    (out_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2))
    skip = {row["id"] for row in done} | set(_bad_ids(bad_path))
    wanted: set[str] = set()  # every sample id of this eval, predicted now or before

    def pending() -> Iterator[Sample]:
        for sample in samples:
            wanted.add(sample.id)
            if sample.id not in skip:
                yield sample

    todo_total = None
    if isinstance(samples, list):
        todo_total = sum(1 for s in samples if s.id not in skip)
    if done:
        logger.info("resuming: %d samples already predicted", len(done))
        predictions_path.write_text("".join(json.dumps(row) + "\n" for row in done))
    started = time.perf_counter()
    kept = [sum(1 for _ in (out_dir / "images").glob("*.jpg"))]
    predicted = 0
    todo = pending()
    try:
        with predictions_path.open("a") as handle, tqdm(total=todo_total, desc="eval", unit="sample") as bar:
            while batch := list(itertools.islice(todo, batch_size)):
                for sample, prediction in _generate_batch(
                    adapter, batch, prompt_suffix, max_new_tokens, on_bad_sample, bad_path
                ):
                    score = score_fn(prediction, sample.answers) if sample.answers else None
                    row = {
                        "id": sample.id,
                        "question": sample.question,
                        "prediction": prediction,
                        "answers": sample.answers,
                        "score": score,
                        "image": _image_reference(sample, score, out_dir, kept),
                        "meta": sample.meta,
                    }
                    handle.write(json.dumps(row) + "\n")
                handle.flush()
                predicted += len(batch)
                bar.update(len(batch))
    except BaseException:
        if created and not read_done(predictions_path):  # failed before any prediction: leave no folder
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    rows = [row for row in read_done(predictions_path) if row["id"] in wanted]
    bad = [sample_id for sample_id in _bad_ids(bad_path) if sample_id in wanted]
    if not rows:
        raise DataError(f"every sample of {data_name} was bad (see {bad_path}); check the data source")
    base: dict[str, Any] = {
        "model": model_name,
        "data": data_name,
        "data_spec": fingerprint["data"],
        "limit": limit,
        "n_samples": len(wanted),
        "n_bad_samples": len(bad),
        "bad_samples": bad[:MAX_LISTED_BAD],
        "on_bad_sample": on_bad_sample,
        "command": command or " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(),
        "seconds": round(elapsed, 2),
        "samples_per_second": round(predicted / elapsed, 2) if predicted and elapsed > 0 else None,
        "generation": {
            "do_sample": False,
            "max_new_tokens": max_new_tokens,
            "prompt_suffix": prompt_suffix,
            "batch_size": batch_size,
        },
        "seed": spec.seed if isinstance(spec, DataSpec) else None,
        "provenance": {**environment(), "model_fingerprint": fingerprint["model"]},
        "fingerprint": digest({key: fingerprint[key] for key in FINGERPRINT_KEYS}),
    }
    submission = _write_submission(out_dir, source, split, rows)
    if submission:
        base["submission"] = submission
    if bad:
        base["notes"] = [
            f"{len(bad)} bad samples skipped (on_bad_sample: skip); listed in {BAD_SAMPLES_FILE}"
        ]
    summary = build_summary(rows, metric_name, base)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if report:
        from vlmkit.eval.report import write_report

        write_report(out_dir)
    return summary


def rescore(
    eval_dir: Path, metric: str, *, command: str | None = None, report: bool = True
) -> dict[str, Any]:
    """Re-score an eval folder's stored predictions with `metric`, without generating.

    Rewrites each row's score, summary.json (with `rescored_from`), fingerprint.json's metric (so
    a later restart with `--metric metric` resumes) and the report.
    """
    score_fn = get_metric(metric)
    predictions_path, summary_path = eval_dir / "predictions.jsonl", eval_dir / "summary.json"
    if not predictions_path.is_file() or not summary_path.is_file():
        raise DataError(
            f"{eval_dir} has no predictions.jsonl/summary.json; pass a folder written by `vlmkit eval`"
        )
    try:
        old = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{summary_path} is not valid JSON ({exc.msg}); rerun the eval") from None
    rows = read_done(predictions_path)
    if not rows:
        raise DataError(f"{predictions_path} holds no predictions to re-score")
    for number, row in enumerate(rows, start=1):
        if "prediction" not in row or "id" not in row:
            raise DataError(f"{predictions_path} line {number} lacks id/prediction; rerun the eval")
        answers = row.get("answers") or []
        row["score"] = score_fn(str(row["prediction"]), answers) if answers else None
    tmp = predictions_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(predictions_path)
    keep = ("model", "data", "data_spec", "limit", "n_samples", "n_bad_samples", "bad_samples",
            "on_bad_sample", "command", "created", "seconds", "samples_per_second", "generation",
            "seed", "provenance", "submission")  # fmt: skip
    base = {key: old[key] for key in keep if key in old}
    base["rescored_from"] = old.get("metric")
    base["rescore_command"] = command or " ".join(sys.argv)
    base["rescored"] = datetime.now(timezone.utc).isoformat()
    fingerprint_path = eval_dir / FINGERPRINT_FILE
    if fingerprint_path.is_file():
        fingerprint = json.loads(fingerprint_path.read_text())
        fingerprint["metric"] = metric
        fingerprint_path.write_text(json.dumps(fingerprint, indent=2))
        base["fingerprint"] = digest({key: fingerprint.get(key) for key in FINGERPRINT_KEYS})
    summary = build_summary(rows, metric, base)
    summary_path.write_text(json.dumps(summary, indent=2))
    if report:
        from vlmkit.eval.report import write_report

        write_report(eval_dir)
    return summary
