"""Metric cases taken from the official definitions (see docs/evaluation.md for the sources)."""

from __future__ import annotations

import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval import metrics
from vlmkit.eval.metrics import (
    DEFAULT_METRIC_FOR_SOURCE,
    METRICS,
    aggregate,
    anls,
    bleu,
    bleu_from_statistics,
    corpus_bleu,
    corpus_bleu_statistics,
    get_metric,
    helm_normalize_text,
    levenshtein,
    quasi_exact_match,
    quasi_prefix_exact_match,
    relaxed_accuracy,
    vqa_accuracy,
    vqa_normalize,
    vqa_process_digit_article,
    vqa_process_punctuation,
)


def ten(*groups: tuple[str, int]) -> list[str]:
    answers = [answer for answer, count in groups for _ in range(count)]
    assert len(answers) == 10
    return answers


# -- VQAv2 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),  # a digit-comma-digit anywhere deletes every punctuation mark
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),  # a trailing period goes
        ("red,white", "red white"),  # a mark touching no space becomes a space
        ("red, white", "red white"),  # a mark next to a space is deleted
        ("hello-world", "hello world"),
        ("don't", "don't"),  # the apostrophe is not in the current punctuation list
    ],
)
def test_vqa_process_punctuation(text: str, expected: str) -> None:
    assert " ".join(vqa_process_punctuation(text).split()) == expected


def test_vqa_period_strip_keeps_the_official_count_quirk() -> None:
    # vqaEval.py passes re.UNICODE (32) as Pattern.sub's `count`: only 32 periods are removed.
    assert vqa_process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("dont", "don't"),
        ("an apple", "apple"),
    ],
)
def test_vqa_process_digit_article(text: str, expected: str) -> None:
    assert vqa_process_digit_article(text) == expected


def test_vqa_normalize_chains_both_steps() -> None:
    assert vqa_normalize("  The Two Dogs.\n") == "2 dogs"


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_leave_one_out_arithmetic(matches: int, expected: float) -> None:
    # k of 10 match: the k subsets leaving out a match see k-1, the others k; min(m/3, 1) averaged.
    answers = ten(("cat", matches), ("dog", 10 - matches))
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("1,000", ten(("1000", 3), ("many", 7)), 0.9),
        ("two", ten(("2", 4), ("3", 6)), 1.0),
        ("a dog", ten(("dog", 3), ("cat", 7)), 0.9),
        ("dont", ten(("don't", 3), ("no", 7)), 0.9),
        ("Yes.", ten(("yes", 9), ("no", 1)), 1.0),
        ("3.5", ten(("35", 5), ("4", 5)), 0.0),
    ],
)
def test_vqa_accuracy_normalises_when_answers_differ(
    prediction: str, answers: list[str], expected: float
) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_identical_answers_are_not_normalised_officially() -> None:
    """vqaEval.py only processes when len(set(gtAnswers)) > 1: "Yes" vs ten "yes" scores 0."""
    yes = ["yes"] * 10
    assert vqa_accuracy("Yes", yes) == 0.0
    assert vqa_accuracy(" yes\n", yes) == 1.0  # newlines/tabs and outer spaces are always cleaned
    assert vqa_accuracy("1,000", ["1000"] * 10) == 0.0
    # lmms-eval always normalises
    assert vqa_accuracy("Yes", yes, normalize="always") == 1.0
    assert get_metric("vqa_accuracy_always")("1,000", ["1000"] * 10) == 1.0


def test_vqa_always_uses_lmms_digit_comma_rule() -> None:
    # "1,,000": the official (\d)(,)(\d) misses it (commas become spaces), lmms-eval's (,)+ form hits.
    answers = ten(("1,,000", 3), ("x", 7))
    assert vqa_accuracy("1000", answers, normalize="official") == 0.0
    assert vqa_accuracy("1000", answers, normalize="always") == pytest.approx(0.9)


def test_vqa_fewer_than_ten_answers_follow_the_same_arithmetic() -> None:
    assert vqa_accuracy("red", ["red"]) == 0.0  # the only answer is always the one left out
    assert vqa_accuracy("red", ["red", "red", "red"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("red", ["red"] * 4) == 1.0
    assert vqa_accuracy("red", []) == 0.0
    with pytest.raises(ConfigError, match="normalize"):
        vqa_accuracy("red", ["red"], normalize="sometimes")  # type: ignore[arg-type]


# -- ANLS ----------------------------------------------------------------------------------------
def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_anls_definition() -> None:
    assert anls("  Hello   WORLD ", ["hello world"]) == 1.0  # case and whitespace do not count
    assert anls("abcd", ["abce"]) == pytest.approx(0.75)
    assert anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)  # best answer wins
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0


def test_anls_at_exactly_the_threshold_is_zero() -> None:
    # NL = 2/4 = 0.5: the paper and RRC script give 0 when NL >= tau (lmms-eval would give 0.5).
    assert anls("abcd", ["abef"]) == 0.0
    assert anls("abcd", ["abef"], threshold=0.6) == pytest.approx(0.5)


# -- ChartQA -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("12%", "0.12", 1.0),  # a percentage parses as a fraction
        ("0.12", "12%", 1.0),
        ("12%", "12", 0.0),  # 0.12 vs 12: numeric, far apart, no string fallback
        ("105", "100", 1.0),  # exactly 5% is within tolerance
        ("105.1", "100", 0.0),
        ("95", "100", 1.0),
        ("0", "0", 1.0),  # zero target: string comparison, as in pix2struct
        ("0.0", "0", 0.0),
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),
        ("yes ", "yes", 0.0),  # no stripping for text, as in the reference
    ],
)
def test_relaxed_accuracy(prediction: str, target: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_registered_takes_best_answer() -> None:
    metric = get_metric("relaxed_accuracy")
    assert metric("12", ["100", "12.3"]) == 1.0
    assert metric("12", ["100"]) == 0.0
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0


# -- HELM ----------------------------------------------------------------------------------------
def test_helm_normalize_text() -> None:
    assert helm_normalize_text("An Apple, please.") == "apple please"
    assert helm_normalize_text("Theatre") == "theatre"  # articles only as whole words
    assert helm_normalize_text("The dog", remove_articles=False) == "the dog"


def test_quasi_exact_and_prefix_match() -> None:
    assert quasi_exact_match("The Dog!", ["dog"]) == 1.0
    assert quasi_exact_match("dogs", ["dog"]) == 0.0
    assert quasi_exact_match("", [""]) == 0.0  # HELM: an empty prediction never matches
    assert quasi_prefix_exact_match("Yes, because it is red.", ["yes"]) == 1.0
    assert quasi_prefix_exact_match("No.", ["yes", "no"]) == 1.0
    assert quasi_prefix_exact_match("Maybe yes", ["yes"]) == 0.0


def test_exact_match_trims_and_ignores_case() -> None:
    assert get_metric("exact_match")(" Red ", ["blue", "red"]) == 1.0
    assert get_metric("exact_match")("red.", ["red"]) == 0.0


# -- BLEU ----------------------------------------------------------------------------------------
def test_bleu_identical_is_one_and_disjoint_is_zero() -> None:
    assert bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu("xyz qqq", ["the cat sat on the mat"]) == 0.0
    assert 0.0 < bleu("the cat sat on a mat", ["the cat sat on the mat"]) < 1.0
    assert bleu("anything", []) == 0.0


def test_corpus_bleu_is_not_the_mean_of_sentence_bleu() -> None:
    # sentence 2 alone is all brevity penalty (exp(1 - 6/3)); pooled, the corpus is long enough.
    predictions = ["the cat sat on the mat today", "a dog ran"]
    references = [["the cat sat on the mat today"], ["a dog ran in the park"]]
    corpus = corpus_bleu(predictions, references)
    sentence = [bleu(p, r) for p, r in zip(predictions, references, strict=True)]
    assert sentence == pytest.approx([1.0, 0.36787944])
    assert corpus == pytest.approx(0.74081822)  # exp(1 - 12/10): corpus brevity penalty only
    assert aggregate("bleu", predictions, references) == pytest.approx(corpus)
    same = "four words at least"
    assert corpus_bleu([same] * 2, [[same], [same]]) == pytest.approx(1.0)
    assert corpus_bleu(["three words only"], [["three words only"]]) == 0.0  # no 4-grams: corpus BLEU-4 is 0


def test_corpus_bleu_from_summed_statistics() -> None:
    predictions = ["the cat sat on the mat", "a dog ran", "blue sky today"]
    references = [
        ["the cat sat on the mat"],
        ["a dog ran in the park"],
        ["the sky is blue today", "blue sky"],
    ]
    rows = corpus_bleu_statistics(predictions, references)
    assert rows.shape[0] == 3
    assert bleu_from_statistics(rows.sum(axis=0)) == pytest.approx(corpus_bleu(predictions, references))
    with pytest.raises(DataError, match="no reference"):
        corpus_bleu(["x"], [[]])


# -- registry ------------------------------------------------------------------------------------
def test_registry_and_defaults() -> None:
    expected = {"exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "quasi_exact_match", "bleu"}
    assert expected <= set(METRICS)
    assert set(DEFAULT_METRIC_FOR_SOURCE.values()) <= set(METRICS)
    assert (
        DEFAULT_METRIC_FOR_SOURCE["vqav2"] == "vqa_accuracy" and DEFAULT_METRIC_FOR_SOURCE["docvqa"] == "anls"
    )
    for name, metric in METRICS.items():  # every registered metric is (prediction, answers) -> [0, 1]
        if name != "helm_bleu_4":  # one token has no 4-gram: HELM's bleu_4 is ~0 there (tested below)
            assert metric("red", ["red", "red", "red", "red"]) == pytest.approx(1.0), name
        assert 0.0 <= metric("blue", ["red"]) <= 1.0
    with pytest.raises(ConfigError, match=r"unknown metric 'nope'.*vqa_accuracy"):
        get_metric("nope")


def test_aggregate_means_per_sample_scores() -> None:
    assert aggregate("exact_match", ["a", "b", "c", "d"], [["a"], ["x"], ["c"], ["y"]]) == 0.5
    assert metrics.is_corpus_metric("bleu") and not metrics.is_corpus_metric("anls")
    with pytest.raises(DataError, match="pair up"):
        aggregate("exact_match", ["a"], [])
    with pytest.raises(DataError, match="no predictions"):
        aggregate("exact_match", [], [])


# -- HELM BLEU -------------------------------------------------------------------------------------
def _reference_helm_bleu(prediction: str, answers: list[str], order: int) -> float:
    """HELM's bleu_1/bleu_4 written out: n-gram precision of one order (clipped counts) times the
    brevity penalty, nltk's unsmoothed conventions (no unigram match: 0; no n-gram match: the
    float minimum), max over references. Tokens from the same nltk tokenizer."""
    import math
    import sys
    from collections import Counter

    from vlmkit.eval.metrics import helm_tokenize

    def grams(tokens: list[str], n: int) -> Counter:
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    best = 0.0
    hyp = helm_tokenize(prediction)
    for answer in answers:
        ref = helm_tokenize(answer)
        unigram_hits = sum((grams(hyp, 1) & grams(ref, 1)).values())
        if unigram_hits == 0:
            score = 0.0
        else:
            hits = sum((grams(hyp, order) & grams(ref, order)).values())
            total = max(1, len(hyp) - order + 1)
            precision = hits / total if hits else sys.float_info.min
            penalty = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
            score = penalty * precision
        best = max(best, score)
    return best


def test_helm_bleu_matches_helm_definition_on_generated_cases() -> None:
    pytest.importorskip("nltk")
    import random

    rng = random.Random(0)
    vocab = ["the", "red", "cat", "sat", "on", "a", "mat", "blue", "two", "dogs", ".", ","]
    checked = 0
    for _ in range(400):
        prediction = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        answers = [
            " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))
        ]
        for name, order in (("helm_bleu_1", 1), ("helm_bleu_4", 4)):
            got = METRICS[name](prediction, answers)
            want = _reference_helm_bleu(prediction, answers, order)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (name, prediction, answers)
            checked += 1
    assert checked == 800


def test_helm_bleu_known_values() -> None:
    pytest.importorskip("nltk")
    sentence = "the cat sat on the mat"
    assert metrics.helm_bleu_4(sentence, [sentence]) == pytest.approx(1.0)
    assert metrics.helm_bleu_1(sentence, [sentence]) == pytest.approx(1.0)
    assert metrics.helm_bleu_4("yes", ["yes"]) < 1e-300  # no 4-gram: HELM's bleu_4 is ~0
    assert metrics.helm_bleu_1("yes", ["yes"]) == 1.0
    assert metrics.helm_bleu_1("two dogs", ["no", "two dogs"]) == 1.0  # max over references
    assert metrics.helm_bleu_1("", ["yes"]) == 0.0
    # not sacrebleu's: sacrebleu's smoothed, effective-order BLEU gives "yes" vs "yes" 1.0 too,
    # but a 4-word answer with one wrong word differs
    assert metrics.helm_bleu_4("a red cat sat", ["a red cat ran"]) < 1e-300
    assert metrics.bleu("a red cat sat", ["a red cat ran"]) > 0.1


def test_group_scores_are_computed_like_the_headline() -> None:
    """Corpus BLEU: headline and group are corpus scores; mean metrics: the mean of stored scores."""
    predictions = ["a red cat sat on the mat", "two dogs"]
    answers = [["a red cat sat on a mat"], ["two dogs"]]
    corpus = aggregate("bleu", predictions, answers)
    assert metrics.group_score("bleu", predictions, answers, [0.0, 0.0]) == corpus
    assert metrics.group_score("exact_match", ["x"], [["y"]], [1.0]) == 1.0
    assert "corpus" in metrics.aggregation_of("bleu") and "mean" in metrics.aggregation_of("helm_bleu_4")
