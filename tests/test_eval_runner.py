"""The eval loop: fingerprinted resume, rescore, unscored samples, submission files, bad samples,
provenance, CLI edges, and plot layout (matplotlib directly; headless Chromium where present)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest

from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.runner import _write_submission, evaluate, rescore
from vlmkit.models.adapters import load_adapter


@pytest.fixture(scope="module")
def adapter(tiny_vlm_dir: Path):
    return load_adapter(tiny_vlm_dir, device="cpu")


def run(adapter, samples, out: Path, model_dir: Path, **kwargs):
    return evaluate(adapter, samples, out, batch_size=4, model_name=str(model_dir), report=False, **kwargs)


def test_restart_with_other_settings_refuses_and_fresh_starts_over(
    adapter, tiny_vlm_dir, easyvqa_samples, tmp_path
):
    samples = easyvqa_samples[:4]
    out = tmp_path / "ev"
    first = run(adapter, samples, out, tiny_vlm_dir)
    assert json.loads((out / "fingerprint.json").read_text())["model"].startswith("sha256:")
    with pytest.raises(ConfigError, match=r"different eval \(prompt_suffix: '' -> ' Be brief.'\).*--fresh"):
        run(adapter, samples, out, tiny_vlm_dir, prompt_suffix=" Be brief.")
    with pytest.raises(ConfigError, match=r"metric: 'exact_match' -> 'anls'.*vlmkit rescore"):
        run(adapter, samples, out, tiny_vlm_dir, metric="anls")
    with pytest.raises(ConfigError, match=r"max_new_tokens: 16 -> 3"):
        run(adapter, samples, out, tiny_vlm_dir, max_new_tokens=3)
    assert json.loads((out / "summary.json").read_text())["score"] == first["score"]  # untouched
    fresh = run(adapter, samples, out, tiny_vlm_dir, prompt_suffix=" Be brief.", resume=False)
    assert fresh["generation"]["prompt_suffix"] == " Be brief."
    assert fresh["n"] == 4


def test_another_model_in_the_same_folder_is_refused(adapter, tiny_vlm_dir, easyvqa_samples, tmp_path):
    other = tmp_path / "other_model"
    shutil.copytree(tiny_vlm_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vlmkit_test_marker"] = 1  # a different checkpoint folder (content differs)
    (other / "config.json").write_text(json.dumps(config))
    run(adapter, easyvqa_samples[:2], tmp_path / "ev", tiny_vlm_dir)
    with pytest.raises(ConfigError, match=r"model: 'sha256:.*' -> 'sha256:"):
        run(adapter, easyvqa_samples[:2], tmp_path / "ev", other)


def test_rescore_rewrites_scores_summary_and_report(adapter, tiny_vlm_dir, easyvqa_samples, tmp_path):
    out = tmp_path / "ev"
    evaluate(adapter, easyvqa_samples[:6], out, batch_size=6, model_name=str(tiny_vlm_dir))
    before = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    summary = rescore(out, "helm_bleu_1")
    after = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in after] == [r["prediction"] for r in before]  # nothing generated
    from vlmkit.eval.metrics import helm_bleu_1

    assert [r["score"] for r in after] == [helm_bleu_1(r["prediction"], r["answers"]) for r in before]
    assert summary["metric"] == "helm_bleu_1" and summary["rescored_from"] == "exact_match"
    assert json.loads((out / "summary.json").read_text())["metric"] == "helm_bleu_1"
    assert "helm_bleu_1" in (out / "report.md").read_text()
    # the folder now resumes under the new metric without generating
    again = run(adapter, easyvqa_samples[:6], out, tiny_vlm_dir, metric="helm_bleu_1")
    assert again["score"] == summary["score"]


def test_samples_without_answers_are_never_scored(adapter, tiny_vlm_dir, easyvqa_samples, tmp_path):
    samples = [
        s if i % 2 else Sample(id=s.id, image=s.image, messages=s.prompt_messages())
        for i, s in enumerate(easyvqa_samples[:6])
    ]
    summary = evaluate(adapter, samples, tmp_path / "mixed", batch_size=6, model_name=str(tiny_vlm_dir))
    rows = [json.loads(line) for line in (tmp_path / "mixed" / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] is None for r in rows] == [True, False] * 3
    assert summary["n"] == 3 and summary["n_unscored"] == 3 and summary["n_predictions"] == 6
    scored = [r["score"] for r in rows if r["score"] is not None]
    assert summary["score"] == pytest.approx(sum(scored) / 3)
    assert any("3 of 6 samples have no reference answer" in note for note in summary["notes"])
    bare = [Sample(id=s.id, image=s.image, messages=s.prompt_messages()) for s in easyvqa_samples[:3]]
    only = evaluate(adapter, bare, tmp_path / "test", batch_size=3, model_name=str(tiny_vlm_dir))
    assert only["score"] is None and only["n"] == 0 and only["n_predictions"] == 3
    assert "predictions only" in only["notes"][0]
    assert "predictions only" in (tmp_path / "test" / "report.md").read_text()


def test_submission_files_have_the_official_formats(tmp_path):
    rows = [
        {"id": "vqav2-test-dev2015-7", "prediction": "yes", "meta": {"question_id": 7}},
        {"id": "vqav2-test-dev2015-9", "prediction": "2", "meta": {}},
    ]
    name = _write_submission(tmp_path, "vqav2", "test-dev2015", rows)
    assert json.loads((tmp_path / name).read_text()) == [
        {"question_id": 7, "answer": "yes"},
        {"question_id": 9, "answer": "2"},
    ]
    name = _write_submission(
        tmp_path, "docvqa", "test", [{"id": "d", "prediction": "x", "meta": {"questionId": 5}}]
    )
    assert json.loads((tmp_path / name).read_text()) == [{"questionId": 5, "answer": "x"}]
    assert _write_submission(tmp_path, "vqav2", "validation", rows) is None


def test_bad_samples_follow_on_bad_sample(adapter, tiny_vlm_dir, easyvqa_samples, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    samples = [*easyvqa_samples[:3], Sample.vqa("broken-one", str(broken), "what color?", ["red"])]
    with pytest.raises(DataError, match=r"broken-one.*--on-bad-sample skip"):
        run(adapter, samples, tmp_path / "fail", tiny_vlm_dir)
    summary = run(adapter, samples, tmp_path / "skip", tiny_vlm_dir, on_bad_sample="skip")
    assert summary["n"] == 3 and summary["n_bad_samples"] == 1 and summary["bad_samples"] == ["broken-one"]
    again = run(adapter, samples, tmp_path / "skip", tiny_vlm_dir, on_bad_sample="skip")  # resume
    assert again["n_bad_samples"] == 1  # counted once
    assert len((tmp_path / "skip" / "bad_samples.jsonl").read_text().splitlines()) == 1


def test_summary_and_report_carry_provenance(adapter, tiny_vlm_dir, easyvqa_samples, tmp_path):
    out = tmp_path / "ev"
    summary = evaluate(
        adapter,
        "easyvqa:test",
        out,
        batch_size=4,
        limit=4,
        model_name=str(tiny_vlm_dir),
        prompt_suffix=" Short.",
    )
    provenance = summary["provenance"]
    for key in ("vlmkit", "torch", "transformers", "python", "git_commit", "model_fingerprint"):
        assert key in provenance
    assert provenance["torch"] and provenance["transformers"]
    assert summary["data_spec"]["source"] == "easyvqa" and summary["n_samples"] == 4 and summary["limit"] == 4
    assert summary["generation"]["prompt_suffix"] == " Short." and "seed" in summary
    assert summary["interval"]["method"] == "Wilson score"
    for name in ("report.md", "report.html"):
        text = html.unescape((out / name).read_text())
        assert "provenance.model_fingerprint" in text and "generation.prompt_suffix" in text
        assert "' Short.'" in text and "Wilson score" in text


def test_comparison_states_every_differing_setting_and_plots(adapter, tiny_vlm_dir, tmp_path):
    from vlmkit.eval.compare import compare_evals

    for name, suffix in (("a", ""), ("b", " Answer in one word.")):
        evaluate(
            adapter,
            "easyvqa:test",
            tmp_path / name,
            batch_size=4,
            limit=6,
            model_name=str(tiny_vlm_dir),
            prompt_suffix=suffix,
        )
    result = compare_evals(tmp_path / "a", tmp_path / "b", tmp_path / "cmp")
    settings = {d["setting"]: d for d in result["differences"]}
    assert settings["generation.prompt_suffix"]["b"] == "' Answer in one word.'"
    assert "fingerprint" in settings
    assert result["labels"]["a"] != result["labels"]["b"] and "prompt_suffix" in result["labels"]["b"]
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Settings that differ" in markdown and "generation.prompt_suffix" in markdown
    assert (tmp_path / "cmp" / "comparison_assets" / "scores_overall.png").is_file()
    assert "data:image/png;base64" in (tmp_path / "cmp" / "comparison.html").read_text()


# -- CLI edges ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "-1"], "--limit -1 must be at least 1"),
        (["--limit", "0"], "--limit 0 must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--metric", "nope"], "unknown metric 'nope'"),
        (["--on-bad-sample", "ignore"], "on_bad_sample 'ignore'"),
    ],
)
def test_cli_edges_fail_in_one_line_before_the_model_loads(extra, message, tmp_path, monkeypatch, capsys):
    from vlmkit import cli
    from vlmkit.models import adapters

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(adapters, "load_adapter", no_load)
    out = tmp_path / "out"
    monkeypatch.setattr(
        "sys.argv", ["vlmkit", "eval", "--model", str(tmp_path / "m"), "--out", str(out), *extra]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written by a failed run


def test_failed_run_leaves_no_out_folder(adapter, tiny_vlm_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    out = tmp_path / "out"
    with pytest.raises(DataError):
        run(adapter, [Sample.vqa("b", str(broken), "q?", ["a"])], out, tiny_vlm_dir)
    assert not out.exists()


# -- plots ----------------------------------------------------------------------------------------
def _layout_problems(figure) -> list[str]:
    """Texts outside the figure, and overlapping tick labels, measured by matplotlib's renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = figure.bbox
    problems = []
    titles = [axes.title for axes in figure.axes] + [figure._suptitle] if figure._suptitle else []
    assert any(t.get_text() for t in titles), "the plot has a title"
    for text in titles:
        title = text.get_window_extent(renderer)
        if title.x0 < box.x0 - 1 or title.x1 > box.x1 + 1 or title.y1 > box.y1 + 1:
            problems.append(f"title {text.get_text()!r} clipped")
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            ticks = [tick for tick in axis.get_major_ticks() if low - 1e-9 <= tick.get_loc() <= high + 1e-9]
            labels = [tick.label1 for tick in ticks if tick.label1.get_visible() and tick.label1.get_text()]
            extents = [t.get_window_extent(renderer) for t in labels]
            for label, extent in zip(labels, extents, strict=True):
                if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1:
                    problems.append(f"tick label {label.get_text()!r} clipped")
            for i in range(len(extents)):
                for j in range(i + 1, len(extents)):
                    if extents[i].overlaps(extents[j]):
                        problems.append(f"{labels[i].get_text()!r} overlaps {labels[j].get_text()!r}")
    return problems


def _rows(count: int, high: bool):
    from vlmkit.eval.report import GroupRow
    from vlmkit.eval.stats import wilson_ci

    return [
        GroupRow(
            f"what is the {i}th long question type label",
            300,
            wilson_ci(300 - (i % 3) if high else 100 + 10 * i, 300),
        )
        for i in range(count)
    ]


def test_plots_fit_the_axis_to_high_scores_and_keep_text_inside():
    from vlmkit.eval.report import interval_plot_figure

    rows = _rows(15, high=True)
    title = "exact_match by answer length (words of the most common reference answer) on a long dataset name"
    figure = interval_plot_figure(
        [r.group for r in rows], [("score", [r.interval for r in rows])], title, "question_type"
    )
    assert _layout_problems(figure) == []
    low, high = figure.axes[0].get_xlim()
    assert low > 0.8 and high <= 1.0  # 0.990 vs 1.000 is visible, not squashed on a 0-1 axis
    few = _rows(3, high=False)
    figure = interval_plot_figure(
        [r.group for r in few],
        [("A", [r.interval for r in few]), ("B", [r.interval for r in few])],
        title,
        "k",
    )
    assert _layout_problems(figure) == []


def test_report_pngs_render_unclipped_in_headless_chromium(adapter, tiny_vlm_dir, tmp_path):
    """Open the report's PNGs in headless Chromium: each decodes at its full size, and the right
    and bottom edge columns are background (nothing drawn up to the border: no clipped text)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian chromium and chromedriver are not installed")
    evaluate(adapter, "easyvqa:test", tmp_path / "ev", batch_size=8, limit=16, model_name=str(tiny_vlm_dir))
    pngs = sorted((tmp_path / "ev" / "report_assets").glob("*.png"))
    assert pngs
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        for png in pngs:
            browser.get(png.as_uri())
            size = browser.execute_script(
                "const i = document.querySelector('img'); return [i.naturalWidth, i.naturalHeight];"
            )
            from PIL import Image

            with Image.open(png) as image:
                assert size == list(image.size)
                rgb = image.convert("RGB")
                width, height = rgb.size
                edges = [rgb.getpixel((width - 1, y)) for y in range(height)]
                edges += [rgb.getpixel((x, height - 1)) for x in range(width)]
                edges += [rgb.getpixel((x, 0)) for x in range(width)]
            assert all(pixel == (255, 255, 255) for pixel in edges), f"{png.name} draws up to its border"
    finally:
        browser.quit()


def test_embedded_images_reach_the_gallery_and_chartqa_breaks_down_by_origin(adapter, tiny_vlm_dir, tmp_path):
    """Parquet rows carry their image as bytes, not a path: the wrong answers' images are kept
    (small, capped) in the eval folder so the report's gallery shows them; ChartQA's
    human-written and augmented questions get their own breakdown."""
    from PIL import Image

    from vlmkit.data.sources import DataSpec
    from vlmkit.eval import runner
    from vqa_fixtures import write_chartqa

    data = DataSpec(
        source="chartqa", split="test", path=str(write_chartqa(tmp_path / "chartqa", "test", n=6))
    )
    out = tmp_path / "eval"
    summary = evaluate(adapter, data, out, batch_size=6, model_name=str(tiny_vlm_dir))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    wrong = [r for r in rows if r["score"] < runner.CORRECT_THRESHOLD]
    assert wrong, "a random model answers these chart questions wrong"
    for row in rows:
        if row in wrong:
            with Image.open(out / row["image"]) as image:
                assert image.format == "JPEG" and max(image.size) <= 320
        else:
            assert row["image"] is None
    assert summary["by_human_or_machine"]["human"]["n"] == 3
    assert summary["by_human_or_machine"]["augmented"]["n"] == 3
    report = (out / "report.md").read_text()
    assert "## By human_or_machine" in report
    assert "(no image)" not in report and report.count("report_assets/thumbs/") == len(wrong)


def test_kept_gallery_images_are_capped(adapter, tiny_vlm_dir, tmp_path, monkeypatch):
    from vlmkit.eval import runner
    from vqa_fixtures import write_chartqa

    monkeypatch.setattr(runner, "GALLERY_IMAGES", 2)
    from vlmkit.data.sources import DataSpec

    data = DataSpec(
        source="chartqa", split="test", path=str(write_chartqa(tmp_path / "chartqa", "test", n=6))
    )
    evaluate(adapter, data, tmp_path / "eval", batch_size=6, model_name=str(tiny_vlm_dir), report=False)
    assert len(list((tmp_path / "eval" / "images").glob("*.jpg"))) == 2
