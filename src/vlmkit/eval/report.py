"""Eval reports: one eval folder -> report.md, report.html and PNG plots beside them.

A single number hides what a model gets wrong. The report adds the score's bootstrap interval,
the breakdown by the dataset's question/answer types, score by answer length, and a gallery of
wrong answers with their images. The HTML is self-contained (inline CSS, images as data URIs) so
it can be mailed or attached to a ticket; the Markdown links PNG/JPEG files in `report_assets/`.

Eval folder format (written by `vlmkit eval`): `predictions.jsonl` with one object per sample
`{"id", "question", "prediction", "answers", "score", "image", "meta"}` and `summary.json`
`{"metric", "score", "n", "model", "data", "command", "created", ...}`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.metrics import CORPUS_STATISTICS
from vlmkit.eval.stats import Interval, Statistic, score_ci

logger = logging.getLogger(__name__)

#: Meta keys a summary and report break scores down by (ChartQA: human-written vs augmented).
CATEGORY_KEYS = ("question_type", "answer_type", "human_or_machine")
#: The summary key of each breakdown.
BREAKDOWN_KEYS = tuple(f"by_{key}" for key in CATEGORY_KEYS)
#: A sample counts as wrong (gallery) / correct (flips) on which side of this score it falls.
CORRECT_THRESHOLD = 0.5
ASSETS_DIR = "report_assets"
LENGTH_BUCKETS = ("1", "2", "3", "4", "5+")
MAX_PLOTTED_CATEGORIES = 40


# -- loading ----------------------------------------------------------------------------------
@dataclass
class EvalRecord:
    """One line of predictions.jsonl."""

    id: str
    prediction: str
    answers: list[str]
    score: float
    question: str = ""
    image: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    scored: bool = True  # False: no reference answer, `score` is a placeholder 0 and never used

    @property
    def correct(self) -> bool:
        return self.scored and self.score >= CORRECT_THRESHOLD


@dataclass
class EvalRun:
    """An eval folder: its summary and per-sample records (in file order)."""

    path: Path
    summary: dict[str, Any]
    records: list[EvalRecord]

    @property
    def scored(self) -> list[EvalRecord]:
        """The records with reference answers: the only ones any score is computed from."""
        return [record for record in self.records if record.scored]

    @property
    def metric(self) -> str:
        return str(self.summary.get("metric", "score"))

    @property
    def label(self) -> str:
        """A short name for tables: the model, else the folder name."""
        model = self.summary.get("model")
        return str(model) if model else self.path.name


def _record(raw: Any, where: str) -> EvalRecord:
    if not isinstance(raw, dict):
        raise DataError(f"{where} is not a JSON object; each line of predictions.jsonl must be one")
    missing = [key for key in ("id", "prediction", "score") if key not in raw]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}; rewrite the folder with `vlmkit eval`")
    answers = raw.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    scored = raw["score"] is not None
    try:
        score = float(raw["score"]) if scored else 0.0
    except (TypeError, ValueError):
        raise DataError(f"{where} has a non-numeric score {raw['score']!r}") from None
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    return EvalRecord(
        id=str(raw["id"]),
        prediction=str(raw["prediction"] if raw["prediction"] is not None else ""),
        answers=[str(answer) for answer in answers],
        score=score,
        question=str(raw.get("question") or ""),
        image=str(raw["image"]) if raw.get("image") else None,
        meta=meta,
        scored=scored,
    )


def to_record(raw: dict[str, Any]) -> EvalRecord:
    """A predictions.jsonl row (as the runner writes it) as an EvalRecord."""
    return _record(raw, f"prediction {raw.get('id')!r}")


def load_eval(eval_dir: str | Path) -> EvalRun:
    """Read an eval folder, with one-line errors naming the file and line that is wrong."""
    path = Path(eval_dir)
    predictions_file, summary_file = path / "predictions.jsonl", path / "summary.json"
    if not predictions_file.is_file():
        raise DataError(f"{path} has no predictions.jsonl; pass a folder written by `vlmkit eval`")
    if not summary_file.is_file():
        raise DataError(f"{path} has no summary.json; pass a folder written by `vlmkit eval`")
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{summary_file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{summary_file} must hold a JSON object")
    records: list[EvalRecord] = []
    with predictions_file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{predictions_file} line {number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg})") from None
            records.append(_record(raw, where))
    if not records:
        raise DataError(f"{predictions_file} holds no predictions; the eval produced no samples")
    return EvalRun(path=path, summary=summary, records=records)


# -- scoring ----------------------------------------------------------------------------------
@dataclass
class Scoring:
    """Per-sample values aligned with a run's records and how to turn a subset into a score.

    For mean metrics the values are the stored scores; for corpus metrics (BLEU) they are rows
    of sufficient statistics so subsets and bootstrap resamples get the true corpus score.
    """

    values: np.ndarray
    statistic: Statistic | None = None
    note: str = ""

    def score(self, mask: np.ndarray | None = None) -> float:
        values = self.values if mask is None else self.values[mask]
        return float(values.mean()) if self.statistic is None else self.statistic(values)

    def interval(self, mask: np.ndarray | None = None, n: int = 1000, seed: int = 0) -> Interval:
        values = self.values if mask is None else self.values[mask]
        return score_ci(values, n=n, seed=seed, statistic=self.statistic)


def scoring_for(metric: str, records: Sequence[EvalRecord]) -> Scoring:
    """How `metric` aggregates over these records (falls back to the mean of stored scores)."""
    scores = np.asarray([record.score for record in records], dtype=np.float64)
    if metric not in CORPUS_STATISTICS:
        return Scoring(scores)
    extract, score_fn = CORPUS_STATISTICS[metric]
    try:
        rows = extract([r.prediction for r in records], [r.answers for r in records])
    except (ConfigError, DataError) as exc:
        logger.warning("cannot recompute corpus %s (%s); using the mean of per-sample scores", metric, exc)
        return Scoring(scores, note=f"mean of per-sample {metric} (corpus {metric} unavailable: {exc})")

    def statistic(block: np.ndarray) -> float:
        return score_fn(block.sum(axis=0))

    return Scoring(rows.astype(np.float64), statistic, note=f"corpus {metric} of each subset")


def reference_length(answers: Sequence[str]) -> int:
    """Words in the most frequent reference answer (ties: the first listed); 0 without answers."""
    if not answers:
        return 0
    counts = Counter(answers)
    best = max(answers, key=lambda answer: (counts[answer], -answers.index(answer)))
    return len(best.split())


def length_bucket(answers: Sequence[str]) -> str:
    words = reference_length(answers)
    return "0" if words == 0 else LENGTH_BUCKETS[min(words, len(LENGTH_BUCKETS)) - 1]


@dataclass
class GroupRow:
    """One row of a breakdown table."""

    group: str
    n: int
    interval: Interval

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "n": self.n, **self.interval.to_dict()}


def breakdown(
    keys: Sequence[str | None],
    scoring: Scoring,
    n: int = 1000,
    seed: int = 0,
    order: Sequence[str] | None = None,
) -> list[GroupRow]:
    """Score and interval per group key (None keys are skipped); largest groups first."""
    labels = np.asarray(["" if key is None else str(key) for key in keys], dtype=object)
    present = [key for key in keys if key is not None]
    groups = list(order) if order is not None else [g for g, _ in Counter(map(str, present)).most_common()]
    rows = []
    for group in groups:
        mask = labels == group
        if mask.any():
            rows.append(GroupRow(group, int(mask.sum()), scoring.interval(mask, n=n, seed=seed)))
    return rows


def category_keys(records: Sequence[EvalRecord]) -> list[str]:
    """The CATEGORY_KEYS that at least one record's meta carries."""
    return [key for key in CATEGORY_KEYS if any(record.meta.get(key) is not None for record in records)]


# -- images -----------------------------------------------------------------------------------
def resolve_image(image: str | None, base: Path) -> Path | None:
    """An image path as written by the runner: absolute, relative to the eval folder, or to cwd."""
    if not image:
        return None
    path = Path(image)
    candidates = [path] if path.is_absolute() else [base / path, Path.cwd() / path]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def thumbnail_jpeg(path: Path | None, max_side: int = 160) -> bytes | None:
    """A small JPEG of the image, or None (logged) when it is missing or unreadable."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        logger.warning("no thumbnail for %s: %s", path, exc)
        return None
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# -- plots ------------------------------------------------------------------------------------
def fitted_limits(lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float]:
    """An x range fitted to the intervals (so 0.990 vs 0.998 is visible), padded, within [0, 1]
    when the scores are; it starts at 0 only when the data come near it."""
    low, high = min(lows, default=0.0), max(highs, default=1.0)
    span = max(high - low, 0.02)
    lo, hi = low - 0.15 * span, high + 0.15 * span
    if low >= 0.0 and high <= 1.0:
        lo, hi = max(0.0, lo), min(1.0, hi)
        if lo < 0.1:
            lo = 0.0
    if hi - lo < 0.02:
        hi = lo + 0.02
    return lo, hi


def interval_plot_figure(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[Interval]]],
    title: str,
    ylabel: str,
    xlabel: str = "score",
) -> Any:
    """Scores as points with interval whiskers, one row per group (several series side by side).

    Points, not bars: the x axis is fitted to the data, which bars from a non-zero baseline would
    misrepresent. Labels sit on the y axis (never overlap), the title is wrapped to the figure
    width and constrained layout keeps every text inside the figure.
    """
    import textwrap

    from matplotlib.figure import Figure

    labels = list(labels)[:MAX_PLOTTED_CATEGORIES]
    count = max(len(labels), 1)
    width = 7.0
    figure = Figure(
        figsize=(width, 1.5 + 0.32 * count * max(1, len(series)) ** 0.5), dpi=100, layout="constrained"
    )
    axes = figure.subplots()
    colours = ("#4C72B0", "#DD8452", "#55A868")
    offsets = np.linspace(-0.18, 0.18, len(series)) if len(series) > 1 else np.zeros(1)
    lows, highs = [], []
    positions = np.arange(len(labels))[::-1]
    for (name, intervals), offset, colour in zip(series, offsets, colours, strict=False):
        intervals = list(intervals)[: len(labels)]
        est = np.asarray([i.estimate for i in intervals])
        err = np.asarray(
            [
                [max(i.estimate - i.low, 0.0) for i in intervals],
                [max(i.high - i.estimate, 0.0) for i in intervals],
            ]
        )
        axes.errorbar(
            est, positions[: len(intervals)] + offset, xerr=err, fmt="o", color=colour, ecolor=colour,
            capsize=3, markersize=5, label=name,
        )  # fmt: skip
        lows += [i.low for i in intervals]
        highs += [i.high for i in intervals]
    axes.set_yticks(positions, [textwrap.shorten(label, 40, placeholder="…") for label in labels], fontsize=8)
    axes.set_ylim(-0.7, len(labels) - 0.3)
    axes.set_xlim(*fitted_limits(lows, highs))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8, loc="best")
    # on the figure, not the axes: an axes-centred title shifted right by long group labels is clipped
    figure.suptitle("\n".join(textwrap.wrap(title, 64)), fontsize=10)
    return figure


def figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def bar_plot_png(rows: Sequence[GroupRow], title: str, xlabel: str, horizontal: bool = True) -> bytes:
    """Scores per group with their intervals, as PNG bytes (Agg, no pyplot). `horizontal` is kept
    for callers; every plot now puts the groups on the y axis."""
    del horizontal
    rows = list(rows)
    figure = interval_plot_figure(
        [f"{row.group} (n={row.n})" for row in rows],
        [("score", [row.interval for row in rows])],
        title,
        xlabel,
    )
    return figure_png(figure)


# -- rendering helpers --------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top;font-size:.92em}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.score{font-size:1.4em;font-weight:600}.muted{color:#666;font-size:.9em}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em;font-size:.88em}
.card img{max-width:100%;display:block;margin-bottom:.3em}
.bad{color:#b00020}.good{color:#1b7a1b}img.plot{max-width:100%}
"""


def html_page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")  # no raw HTML from predictions


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], raw: Sequence[int] = ()) -> list[str]:
    """Markdown table lines; columns listed in `raw` hold already-rendered Markdown."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(cell) if index in raw else md_cell(cell) for index, cell in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            css = ' class="num"' if index in numeric else ""
            cells.append(f"<td{css}>{html.escape(str(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def fmt_interval(interval: Interval) -> str:
    return f"{fmt(interval.low)} – {fmt(interval.high)}"


def safe_name(index: int, suffix: str) -> str:
    return f"{index:04d}{suffix}"


# -- the report ---------------------------------------------------------------------------------
@dataclass
class _Plot:
    title: str
    filename: str
    png: bytes


@dataclass
class _Card:
    record: EvalRecord
    thumb_file: str | None
    thumb: bytes | None


def _plots(breakdowns: dict[str, list[GroupRow]], length_rows: list[GroupRow], metric: str) -> list[_Plot]:
    plots = []
    for key, rows in breakdowns.items():
        if rows:
            title = f"{metric} by {key}"
            png = bar_plot_png(rows, title, key)
            plots.append(_Plot(title, f"score_by_{key}.png", png))
    if length_rows:
        title = f"{metric} by answer length (words of the most common reference)"
        plots.append(_Plot(title, "score_by_answer_length.png", bar_plot_png(length_rows, title, "words")))
    return plots


def _gallery(run: EvalRun, limit: int, assets: Path) -> list[_Card]:
    for stale in (assets / "thumbs").glob("[0-9][0-9][0-9][0-9].jpg"):
        stale.unlink()  # thumbnails of a previous report of this folder
    wrong = [record for record in run.scored if not record.correct]
    wrong.sort(key=lambda record: record.score)  # stable: file order within equal scores
    cards = []
    for index, record in enumerate(wrong[:limit]):
        thumb = thumbnail_jpeg(resolve_image(record.image, run.path))
        name = None
        if thumb is not None:
            name = f"thumbs/{safe_name(index, '.jpg')}"
            (assets / name).write_bytes(thumb)
        cards.append(_Card(record, name, thumb))
    return cards


def write_report(
    eval_dir: str | Path,
    *,
    gallery_size: int = 24,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> None:
    """Write report.md, report.html and report_assets/ (plots, thumbnails) into `eval_dir`."""
    run = load_eval(eval_dir)
    assets = run.path / ASSETS_DIR
    (assets / "thumbs").mkdir(parents=True, exist_ok=True)
    for stale in assets.glob("score_by_*.png"):
        stale.unlink()  # plots of a previous report (another metric, or a scored run)
    metric = run.metric
    scored = run.scored
    if not scored:
        _write_predictions_only(run)
        return
    scoring = scoring_for(metric, scored)
    overall = scoring.interval(n=n_bootstrap, seed=seed)
    breakdowns = {
        key: breakdown([r.meta.get(key) for r in scored], scoring, n=n_bootstrap, seed=seed)
        for key in category_keys(scored)
    }
    buckets = [length_bucket(record.answers) for record in scored]
    order = [bucket for bucket in ("0", *LENGTH_BUCKETS) if bucket in buckets]
    length_rows = breakdown(buckets, scoring, n=n_bootstrap, seed=seed, order=order)
    plots = _plots(breakdowns, length_rows, metric)
    for plot in plots:
        (assets / plot.filename).write_bytes(plot.png)
    cards = _gallery(run, gallery_size, assets)
    n_wrong = sum(not record.correct for record in scored)
    stored = run.summary.get("score")
    headline = float(stored) if stored is not None else overall.estimate
    context = _ReportContext(
        run, metric, headline, overall, scoring, breakdowns, length_rows, plots, cards, n_wrong
    )
    (run.path / "report.md").write_text(_markdown(context, n_bootstrap), encoding="utf-8")
    (run.path / "report.html").write_text(_html(context, n_bootstrap), encoding="utf-8")
    logger.info("wrote %s and %s", run.path / "report.md", run.path / "report.html")


@dataclass
class _ReportContext:
    run: EvalRun
    metric: str
    headline: float
    overall: Interval
    scoring: Scoring
    breakdowns: dict[str, list[GroupRow]]
    length_rows: list[GroupRow]
    plots: list[_Plot]
    cards: list[_Card]
    n_wrong: int


#: Summary keys shown elsewhere in the report (score line, tables, notes), not in the run table.
_NOT_FACTS = ("score", "interval", *BREAKDOWN_KEYS, "notes")


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested summary values as dotted (key, text) rows, so no setting is dropped from a table."""
    if isinstance(value, dict):
        if not value and prefix:
            return [(prefix, "{}")]
        out: list[tuple[str, str]] = []
        for key, item in value.items():
            out += flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list):
        return [(prefix, ", ".join(map(str, value)) if value else "[]")]
    return [(prefix, repr(value) if isinstance(value, str) and value != value.strip() else str(value))]


def _facts(run: EvalRun) -> list[tuple[str, str]]:
    """Every setting and provenance fact of the summary (nested ones dotted), key facts first."""
    keys = ("model", "data", "metric", "aggregation", "n", "n_unscored", "created", "command")
    facts = [(key, str(run.summary[key])) for key in keys if key in run.summary]
    rest = {k: v for k, v in run.summary.items() if k not in (*keys, *_NOT_FACTS)}
    return facts + flatten(rest)


def _write_predictions_only(run: EvalRun) -> None:
    """The report of a split without reference answers: settings, counts, the first predictions."""
    esc = html.escape
    note = "No sample has a reference answer: predictions only, nothing is scored."
    submission = run.summary.get("submission")
    if submission:
        note += f" Submission file for the benchmark's server: {submission}."
    rows = [(r.id, r.question, r.prediction) for r in run.records[:50]]
    lines = [
        f"# Eval report: {md_cell(run.label)}",
        "",
        *md_table(["run", ""], _facts(run)),
        "",
        f"**{note}**",
    ]
    lines += ["", f"## First predictions ({len(rows)} of {len(run.records)})", ""]
    lines += md_table(["id", "question", "prediction"], rows)
    (run.path / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    body = [
        f"<h1>Eval report: {esc(run.label)}</h1>",
        html_table(["run", ""], _facts(run)),
        f'<p class="score">{esc(note)}</p>',
        f"<h2>First predictions ({len(rows)} of {len(run.records)})</h2>",
        html_table(["id", "question", "prediction"], rows),
    ]
    (run.path / "report.html").write_text(html_page(f"Eval report: {run.label}", body), encoding="utf-8")


def _score_lines(ctx: _ReportContext, n_bootstrap: int) -> tuple[str, str]:
    level = round(ctx.overall.level * 100)
    method = ctx.overall.method
    if "bootstrap" in method and "zero width" not in method:
        method = f"{method}, {n_bootstrap} resamples"
    interval = f"{level}% CI {fmt_interval(ctx.overall)} ({method})"
    note = ""
    if abs(ctx.headline - ctx.overall.estimate) >= 5e-5:  # visible at the 4 decimals shown
        note = f"recomputed from predictions.jsonl: {fmt(ctx.overall.estimate)}"
    if ctx.scoring.note:
        note = "; ".join(part for part in (note, ctx.scoring.note) if part)
    notes = [str(item) for item in ctx.run.summary.get("notes") or []]
    note = "; ".join(part for part in (note, *notes) if part)
    return interval, note


def _rows_for_table(rows: Sequence[GroupRow]) -> list[list[str]]:
    return [[row.group, str(row.n), fmt(row.interval.estimate), fmt_interval(row.interval)] for row in rows]


def _markdown(ctx: _ReportContext, n_bootstrap: int) -> str:
    run = ctx.run
    interval, note = _score_lines(ctx, n_bootstrap)
    lines = [f"# Eval report: {md_cell(run.label)}", ""]
    lines += md_table(["run", ""], _facts(run))
    lines += ["", f"**{ctx.metric}: {fmt(ctx.headline)}** — {interval}"]
    if note:
        lines += ["", f"_{note}_"]
    header = ["group", "n", ctx.metric, "95% CI"]
    for key, rows in ctx.breakdowns.items():
        lines += ["", f"## By {key}", "", *md_table([key, *header[1:]], _rows_for_table(rows))]
    lines += ["", "## By answer length", "", "Words in the most common reference answer.", ""]
    lines += md_table(["words", *header[1:]], _rows_for_table(ctx.length_rows))
    if ctx.plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{md_cell(plot.title)}]({ASSETS_DIR}/{plot.filename})" for plot in ctx.plots]
    lines += ["", f"## Wrong answers ({len(ctx.cards)} of {ctx.n_wrong}, score < {CORRECT_THRESHOLD})", ""]
    rows = []
    for card in ctx.cards:
        image = (
            f"![{md_cell(card.record.id)}]({ASSETS_DIR}/{card.thumb_file})"
            if card.thumb_file
            else "(no image)"
        )
        record = card.record
        rows.append(
            [
                image,
                record.id,
                record.question,
                record.prediction,
                " / ".join(record.answers),
                fmt(record.score),
            ]
        )
    header = ["image", "id", "question", "prediction", "answers", "score"]
    lines += md_table(header, rows, raw=(0,)) if rows else ["None."]
    return "\n".join(lines) + "\n"


def _html(ctx: _ReportContext, n_bootstrap: int) -> str:
    run = ctx.run
    esc = html.escape
    interval, note = _score_lines(ctx, n_bootstrap)
    body = [f"<h1>Eval report: {esc(run.label)}</h1>", html_table(["run", ""], _facts(run))]
    body.append(
        f'<p><span class="score">{esc(ctx.metric)}: {fmt(ctx.headline)}</span> '
        f'<span class="muted">{esc(interval)}</span></p>'
    )
    if note:
        body.append(f'<p class="muted">{esc(note)}</p>')
    plots = {plot.filename: plot for plot in ctx.plots}
    header = ["n", ctx.metric, "95% CI"]
    sections = [(f"By {key}", key, rows, f"score_by_{key}.png") for key, rows in ctx.breakdowns.items()]
    sections.append(("By answer length", "words", ctx.length_rows, "score_by_answer_length.png"))
    for title, column, rows, filename in sections:
        body.append(f"<h2>{esc(title)}</h2>")
        body.append(html_table([column, *header], _rows_for_table(rows), numeric=(1, 2)))
        if filename in plots:
            uri = data_uri(plots[filename].png, "image/png")
            body.append(f'<img class="plot" alt="{esc(plots[filename].title)}" src="{uri}">')
    body.append(f"<h2>Wrong answers ({len(ctx.cards)} of {ctx.n_wrong}, score &lt; {CORRECT_THRESHOLD})</h2>")
    body.append('<div class="gallery">' + "".join(_html_card(card) for card in ctx.cards) + "</div>")
    return html_page(f"Eval report: {run.label}", body)


def _html_card(card: _Card) -> str:
    esc = html.escape
    record = card.record
    image = f'<img alt="{esc(record.id)}" src="{data_uri(card.thumb, "image/jpeg")}">' if card.thumb else ""
    return (
        f'<div class="card">{image}<div class="muted">{esc(record.id)} · score {fmt(record.score)}</div>'
        f"<div><b>Q:</b> {esc(record.question)}</div>"
        f'<div class="bad"><b>Predicted:</b> {esc(record.prediction)}</div>'
        f'<div class="good"><b>Answers:</b> {esc(" / ".join(record.answers))}</div></div>'
    )


__all__ = [
    "BREAKDOWN_KEYS",
    "CATEGORY_KEYS",
    "CORRECT_THRESHOLD",
    "EvalRecord",
    "EvalRun",
    "GroupRow",
    "Scoring",
    "breakdown",
    "category_keys",
    "length_bucket",
    "load_eval",
    "reference_length",
    "scoring_for",
    "write_report",
]
