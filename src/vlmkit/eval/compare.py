"""Compare two eval folders on the same data: is B really better than A, and where?

Samples are matched by id. The difference B - A gets a paired bootstrap interval (both systems
resampled on the same questions), and flips list the questions one system gets right and the
other wrong. A sample counts as right when its score is >= 0.5 (`CORRECT_THRESHOLD`): for 0/1
metrics that is plain correctness, for graded ones (VQA accuracy, ANLS) a flip is a score change
that crosses 0.5.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.errors import DataError
from vlmkit.eval.report import (
    BREAKDOWN_KEYS,
    CATEGORY_KEYS,
    CORRECT_THRESHOLD,
    EvalRecord,
    EvalRun,
    Scoring,
    data_uri,
    figure_png,
    flatten,
    fmt,
    fmt_interval,
    html_page,
    html_table,
    interval_plot_figure,
    load_eval,
    md_cell,
    md_table,
    resolve_image,
    safe_name,
    scoring_for,
    thumbnail_jpeg,
)
from vlmkit.eval.stats import Interval, paired_score_ci

logger = logging.getLogger(__name__)

ASSETS_DIR = "comparison_assets"


@dataclass
class _Pair:
    a: EvalRecord
    b: EvalRecord


def _pairs(run_a: EvalRun, run_b: EvalRun) -> tuple[list[_Pair], int, int]:
    by_id_b = {record.id: record for record in run_b.scored}
    ids_a = {record.id for record in run_a.scored}
    pairs = [_Pair(record, by_id_b[record.id]) for record in run_a.scored if record.id in by_id_b]
    only_a = len(ids_a - by_id_b.keys())
    only_b = len(by_id_b.keys() - ids_a)
    return pairs, only_a, only_b


def _paired_interval(
    scoring_a: Scoring, scoring_b: Scoring, mask: np.ndarray | None, n: int, seed: int
) -> Interval:
    values_a = scoring_a.values if mask is None else scoring_a.values[mask]
    values_b = scoring_b.values if mask is None else scoring_b.values[mask]
    return paired_score_ci(values_a, values_b, n=n, seed=seed, statistic=scoring_a.statistic)


def _side(run: EvalRun, score: float, n_shared: int) -> dict[str, Any]:
    return {
        "path": str(run.path),
        "model": run.summary.get("model"),
        "data": run.summary.get("data"),
        "score": score,
        "summary_score": run.summary.get("score"),
        "n": len(run.scored),
        "n_unscored": len(run.records) - len(run.scored),
        "n_shared": n_shared,
        "settings": dict(_settings(run)),
    }


#: Summary keys that describe how a run was made (compared between A and B); timings excluded.
_VOLATILE = ("created", "seconds", "samples_per_second", "rescored", "score", "interval", "n",
             *BREAKDOWN_KEYS, "notes", "bad_samples")  # fmt: skip


def _settings(run: EvalRun) -> list[tuple[str, str]]:
    return flatten({k: v for k, v in run.summary.items() if k not in _VOLATILE})


def setting_differences(run_a: EvalRun, run_b: EvalRun) -> list[dict[str, str | None]]:
    """Every setting (dotted key) whose value differs between A and B, missing ones included."""
    a, b = dict(_settings(run_a)), dict(_settings(run_b))
    keys = list(a) + [key for key in b if key not in a]
    return [{"setting": key, "a": a.get(key), "b": b.get(key)} for key in keys if a.get(key) != b.get(key)]


def _labels(run_a: EvalRun, run_b: EvalRun, differences: list[dict[str, str | None]]) -> tuple[str, str]:
    """Side labels; when both name the same model, the first differing setting tells them apart."""
    label_a, label_b = run_a.label, run_b.label
    if label_a != label_b:
        return label_a, label_b
    useful = [d for d in differences if d["setting"] not in ("command", "fingerprint")] or differences
    if not useful:
        return f"{label_a} [{run_a.path.name}]", f"{label_b} [{run_b.path.name}]"
    first = useful[0]
    return (
        f"{label_a} ({first['setting']}={first['a']})",
        f"{label_b} ({first['setting']}={first['b']})",
    )


def compare_evals(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    *,
    gallery_size: int = 12,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare eval folders A and B; write comparison.json/.md/.html to `out`; return the summary.

    Raises DataError when the runs used different metrics or share no sample ids. Scores are
    recomputed on the shared ids only, so they can differ from each run's own summary score.
    """
    run_a, run_b = load_eval(a), load_eval(b)
    if run_a.metric != run_b.metric:
        raise DataError(
            f"{run_a.path} was scored with {run_a.metric} and {run_b.path} with {run_b.metric}; "
            "re-run one eval with the other's --metric"
        )
    pairs, only_a, only_b = _pairs(run_a, run_b)
    if not pairs:
        raise DataError(
            f"{run_a.path} and {run_b.path} share no sample ids ({only_a} and {only_b} ids); "
            "compare evals of the same data"
        )
    if only_a or only_b:
        logger.warning("comparing %d shared ids; %d only in A, %d only in B", len(pairs), only_a, only_b)
    if run_a.summary.get("data") != run_b.summary.get("data"):
        logger.warning(
            "the runs name different data (%s vs %s)", run_a.summary.get("data"), run_b.summary.get("data")
        )
    metric = run_a.metric
    differences = setting_differences(run_a, run_b)
    label_a, label_b = _labels(run_a, run_b, differences)
    scoring_a = scoring_for(metric, [pair.a for pair in pairs])
    scoring_b = scoring_for(metric, [pair.b for pair in pairs])
    difference = _paired_interval(scoring_a, scoring_b, None, n_bootstrap, seed)
    wrong_to_right = [p for p in pairs if not p.a.correct and p.b.correct]
    right_to_wrong = [p for p in pairs if p.a.correct and not p.b.correct]
    categories = _categories(pairs, scoring_a, scoring_b, n_bootstrap, seed)
    summary: dict[str, Any] = {
        "metric": metric,
        "a": _side(run_a, scoring_a.score(), len(pairs)),
        "b": _side(run_b, scoring_b.score(), len(pairs)),
        "n_shared": len(pairs),
        "only_in_a": only_a,
        "only_in_b": only_b,
        "difference": {
            **difference.to_dict(),
            "direction": "B - A",
            "n_bootstrap": n_bootstrap,
            "seed": seed,
        },
        "flips": {
            "wrong_to_right": len(wrong_to_right),
            "right_to_wrong": len(right_to_wrong),
            "threshold": CORRECT_THRESHOLD,
        },
        "categories": categories,
        "labels": {"a": label_a, "b": label_b},
        "differences": differences,
    }
    summary["a"]["score_interval"] = scoring_a.interval(n=n_bootstrap, seed=seed).to_dict()
    summary["b"]["score_interval"] = scoring_b.interval(n=n_bootstrap, seed=seed).to_dict()
    out_dir = Path(out)
    (out_dir / ASSETS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / ASSETS_DIR).glob("[rw]2[rw]_[0-9][0-9][0-9][0-9].jpg"):
        stale.unlink()  # thumbnails of a previous comparison written here
    galleries = {
        "wrong_to_right": _cards(wrong_to_right[:gallery_size], run_a, run_b, out_dir, "w2r"),
        "right_to_wrong": _cards(right_to_wrong[:gallery_size], run_a, run_b, out_dir, "r2w"),
    }
    plots = _comparison_plots(pairs, scoring_a, scoring_b, summary, n_bootstrap, seed)
    for stale in (out_dir / ASSETS_DIR).glob("scores_*.png"):
        stale.unlink()
    for filename, (_, png) in plots.items():
        (out_dir / ASSETS_DIR / filename).write_bytes(png)
    summary["plots"] = [f"{ASSETS_DIR}/{name}" for name in plots]
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "comparison.md").write_text(_markdown(summary, galleries), encoding="utf-8")
    (out_dir / "comparison.html").write_text(_html(summary, galleries, plots), encoding="utf-8")
    logger.info("wrote comparison of %s and %s to %s", run_a.path, run_b.path, out_dir)
    return summary


def _comparison_plots(
    pairs: list[_Pair], scoring_a: Scoring, scoring_b: Scoring, summary: dict[str, Any], n: int, seed: int
) -> dict[str, tuple[str, bytes]]:
    """PNG per breakdown (and overall): A's and B's score per group side by side with intervals."""
    labels = summary["labels"]
    metric = summary["metric"]
    groupings: dict[str, tuple[list[str], list[np.ndarray | None]]] = {
        "overall": (["all"], [None]),
    }
    merged = [{**pair.b.meta, **pair.a.meta} for pair in pairs]
    for key, rows in summary["categories"].items():
        values = np.asarray([str(m.get(key)) if m.get(key) is not None else "" for m in merged], dtype=object)
        groups = [row["group"] for row in rows]
        groupings[key] = ([f"{g} (n={row['n']})" for g, row in zip(groups, rows, strict=True)],
                          [values == g for g in groups])  # fmt: skip
    plots = {}
    for key, (names, masks) in groupings.items():
        title = (
            f"{metric} {'overall' if key == 'overall' else 'by ' + key}: A = {labels['a']}, B = {labels['b']}"
        )
        series = [
            ("A", [scoring_a.interval(mask, n=n, seed=seed) for mask in masks]),
            ("B", [scoring_b.interval(mask, n=n, seed=seed) for mask in masks]),
        ]
        figure = interval_plot_figure(names, series, title, "group" if key == "overall" else key, metric)
        filename = "scores_overall.png" if key == "overall" else f"scores_by_{key}.png"
        plots[filename] = (title, figure_png(figure))
    return plots


def _categories(
    pairs: list[_Pair], scoring_a: Scoring, scoring_b: Scoring, n: int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Per question_type/answer_type: n, A, B and the paired interval of B - A (A's meta wins)."""
    merged = [{**pair.b.meta, **pair.a.meta} for pair in pairs]
    out: dict[str, list[dict[str, Any]]] = {}
    for key in [key for key in CATEGORY_KEYS if any(meta.get(key) is not None for meta in merged)]:
        labels = np.asarray(
            [str(meta.get(key)) if meta.get(key) is not None else "" for meta in merged], dtype=object
        )
        groups = sorted({label for label in labels if label}, key=lambda g: (-int((labels == g).sum()), g))
        rows = []
        for group in groups:
            mask = labels == group
            diff = _paired_interval(scoring_a, scoring_b, mask, n, seed)
            rows.append(
                {
                    "group": group,
                    "n": int(mask.sum()),
                    "a": scoring_a.score(mask),
                    "b": scoring_b.score(mask),
                    "difference": diff.to_dict(),
                }
            )
        out[key] = rows
    return out


# -- rendering ------------------------------------------------------------------------------------
@dataclass
class _Card:
    pair: _Pair
    thumb_file: str | None
    thumb: bytes | None


def _cards(pairs: list[_Pair], run_a: EvalRun, run_b: EvalRun, out_dir: Path, prefix: str) -> list[_Card]:
    cards = []
    for index, pair in enumerate(pairs):
        image = resolve_image(pair.a.image, run_a.path) or resolve_image(pair.b.image, run_b.path)
        thumb = thumbnail_jpeg(image)
        name = None
        if thumb is not None:
            name = f"{prefix}_{safe_name(index, '.jpg')}"
            (out_dir / ASSETS_DIR / name).write_bytes(thumb)
        cards.append(_Card(pair, name, thumb))
    return cards


def _overview_rows(summary: dict[str, Any]) -> list[list[str]]:
    diff = summary["difference"]
    interval = Interval(diff["estimate"], diff["low"], diff["high"], diff["level"])
    return [
        [
            "overall",
            str(summary["n_shared"]),
            fmt(summary["a"]["score"]),
            fmt(summary["b"]["score"]),
            f"{diff['estimate']:+.4f}",
            fmt_interval(interval),
        ]
    ]


def _category_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        diff = row["difference"]
        interval = Interval(diff["estimate"], diff["low"], diff["high"], diff["level"])
        out.append(
            [
                row["group"],
                str(row["n"]),
                fmt(row["a"]),
                fmt(row["b"]),
                f"{diff['estimate']:+.4f}",
                fmt_interval(interval),
            ]
        )
    return out


def _verdict(summary: dict[str, Any]) -> str:
    diff = summary["difference"]
    level = round(diff["level"] * 100)
    if diff["low"] > 0:
        return f"B is better than A: the {level}% interval of B - A excludes 0."
    if diff["high"] < 0:
        return f"B is worse than A: the {level}% interval of B - A excludes 0."
    return f"No significant difference: the {level}% interval of B - A contains 0."


def _header(summary: dict[str, Any], first: str = "") -> list[str]:
    return [first, "n", f"A {summary['metric']}", f"B {summary['metric']}", "B - A", "95% CI of B - A"]


def _method(summary: dict[str, Any]) -> str:
    diff = summary["difference"]
    method = str(diff.get("method", "paired bootstrap"))
    if "bootstrap" in method and "zero width" not in method:
        method = f"paired {method}, {diff['n_bootstrap']} resamples"
    return method


def _difference_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [[str(d["setting"]), str(d["a"]), str(d["b"])] for d in summary["differences"]]


def _markdown(summary: dict[str, Any], galleries: dict[str, list[_Card]]) -> str:
    a, b, flips = summary["a"], summary["b"], summary["flips"]
    labels = summary["labels"]
    lines = [
        f"# Comparison: {md_cell(labels['a'])} (A) vs {md_cell(labels['b'])} (B)",
        "",
        f"- A: `{md_cell(a['path'])}` ({a['n']} scored samples)",
        f"- B: `{md_cell(b['path'])}` ({b['n']} scored samples)",
        f"- shared ids: {summary['n_shared']}; only in A: {summary['only_in_a']}; only in B: {summary['only_in_b']}",
        f"- metric: {summary['metric']}; interval of B - A: {_method(summary)}",
        "",
        f"## Settings that differ between A and B ({len(summary['differences'])})",
        "",
        *(
            md_table(["setting", "A", "B"], _difference_rows(summary))
            if summary["differences"]
            else ["None."]
        ),
        "",
        f"**{_verdict(summary)}**",
        "",
        *md_table(_header(summary), _overview_rows(summary)),
        "",
        f"Flips (right = score >= {flips['threshold']}): wrong -> right **{flips['wrong_to_right']}**, "
        f"right -> wrong **{flips['right_to_wrong']}**.",
    ]
    for key, rows in summary["categories"].items():
        lines += ["", f"## By {key}", "", *md_table(_header(summary, key), _category_rows(rows))]
    if summary.get("plots"):
        lines += ["", "## Plots", "", *[f"![{md_cell(path)}]({path})" for path in summary["plots"]]]
    for name, title in (("wrong_to_right", "Wrong -> right"), ("right_to_wrong", "Right -> wrong")):
        lines += ["", f"## {title} ({len(galleries[name])} of {flips[name]})", ""]
        rows = []
        for card in galleries[name]:
            image = (
                f"![{md_cell(card.pair.a.id)}]({ASSETS_DIR}/{card.thumb_file})"
                if card.thumb_file
                else "(no image)"
            )
            pair = card.pair
            rows.append(
                [
                    image,
                    pair.a.id,
                    pair.a.question,
                    pair.a.prediction,
                    pair.b.prediction,
                    " / ".join(pair.a.answers),
                ]
            )
        header = ["image", "id", "question", "A", "B", "answers"]
        lines += md_table(header, rows, raw=(0,)) if rows else ["None."]
    return "\n".join(lines) + "\n"


def _html(
    summary: dict[str, Any], galleries: dict[str, list[_Card]], plots: dict[str, tuple[str, bytes]]
) -> str:
    esc = html.escape
    a, b, flips = summary["a"], summary["b"], summary["flips"]
    labels = summary["labels"]
    title = f"Comparison: {labels['a']} (A) vs {labels['b']} (B)"
    differences = (
        html_table(["setting", "A", "B"], _difference_rows(summary))
        if summary["differences"]
        else "<p>None.</p>"
    )
    body = [
        f"<h1>{esc(title)}</h1>",
        "<ul>"
        f"<li>A: <code>{esc(a['path'])}</code> ({a['n']} scored samples)</li>"
        f"<li>B: <code>{esc(b['path'])}</code> ({b['n']} scored samples)</li>"
        f"<li>shared ids: {summary['n_shared']}; only in A: {summary['only_in_a']}; "
        f"only in B: {summary['only_in_b']}</li>"
        f"<li>metric: {esc(summary['metric'])}; interval of B - A: {esc(_method(summary))}</li></ul>",
        f"<h2>Settings that differ between A and B ({len(summary['differences'])})</h2>",
        differences,
        f'<p class="score">{esc(_verdict(summary))}</p>',
        html_table(_header(summary), _overview_rows(summary), numeric=(1, 2, 3, 4)),
        f"<p>Flips (right = score &ge; {flips['threshold']}): wrong &rarr; right "
        f"<b>{flips['wrong_to_right']}</b>, right &rarr; wrong <b>{flips['right_to_wrong']}</b>.</p>",
    ]
    for key, rows in summary["categories"].items():
        body += [
            f"<h2>By {esc(key)}</h2>",
            html_table(_header(summary, key), _category_rows(rows), numeric=(1, 2, 3, 4)),
        ]
    if plots:
        body.append("<h2>Plots</h2>")
        body += [
            f'<img class="plot" alt="{esc(plot_title)}" src="{data_uri(png, "image/png")}">'
            for plot_title, png in plots.values()
        ]
    for name, heading in (("wrong_to_right", "Wrong &rarr; right"), ("right_to_wrong", "Right &rarr; wrong")):
        body.append(f"<h2>{heading} ({len(galleries[name])} of {flips[name]})</h2>")
        body.append(
            '<div class="gallery">' + "".join(_html_card(card) for card in galleries[name]) + "</div>"
        )
    return html_page(title, body)


def _html_card(card: _Card) -> str:
    esc = html.escape
    pair = card.pair
    image = f'<img alt="{esc(pair.a.id)}" src="{data_uri(card.thumb, "image/jpeg")}">' if card.thumb else ""
    return (
        f'<div class="card">{image}<div class="muted">{esc(pair.a.id)}</div>'
        f"<div><b>Q:</b> {esc(pair.a.question)}</div>"
        f"<div><b>A:</b> {esc(pair.a.prediction)} ({fmt(pair.a.score)})</div>"
        f"<div><b>B:</b> {esc(pair.b.prediction)} ({fmt(pair.b.score)})</div>"
        f'<div class="muted"><b>Answers:</b> {esc(" / ".join(pair.a.answers))}</div></div>'
    )


__all__ = ["compare_evals"]
