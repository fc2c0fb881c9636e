"""Answer metrics with their official definitions, selectable by name.

Every registered metric is a plain function `(prediction, answers) -> float` in [0, 1]. Where a
benchmark has an official scorer (VQAv2, DocVQA, ChartQA, HELM) the function reproduces it,
quirks included, so numbers are comparable with published ones; docs/evaluation.md gives each
definition and the file it was checked against. Corpus-level metrics (BLEU) are not means of
per-sample scores: `aggregate` knows which is which.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Literal

import numpy as np

from vlmkit.errors import ConfigError, DataError

Metric = Callable[[str, Sequence[str]], float]
CorpusMetric = Callable[[Sequence[str], Sequence[Sequence[str]]], float]

# --------------------------------------------------------------------------------------------
# VQAv2 accuracy: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00
# ("Fixed processing answers bug", 2021), the current version. Tables copied verbatim.
# --------------------------------------------------------------------------------------------

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_MANUAL_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = ("a", "an", "the")
# `(?!<=\d)` is a negative *lookahead* for the text "<=digit" (a typo for a lookbehind), so it
# never matches before a "." and the rule is simply: drop every "." not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# lmms-eval's EvalAIAnswerProcessor (via MMF) uses a slightly different digit-comma test.
_COMMA_STRIP_LMMS = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = (
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# vqaEval.py calls `periodStrip.sub("", text, re.UNICODE)`: the third positional argument of
# Pattern.sub is `count`, so at most int(re.UNICODE) == 32 periods are removed. Kept on purpose.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

VQANormalize = Literal["official", "always"]


def vqa_process_punctuation(text: str, comma_strip: re.Pattern[str] = _COMMA_STRIP) -> str:
    """vqaEval.py `processPunctuation`: a mark touching a space (or any text with a digit-comma-digit)
    is deleted, otherwise replaced by a space; then periods not followed by a digit are dropped."""
    out = text
    for mark in _PUNCT:
        if (mark + " " in text or " " + mark in text) or comma_strip.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: lower-case, number words to digits, drop a/an/the,
    expand apostrophe-less contractions ("dont" -> "don't")."""
    words = [_MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize(text: str, comma_strip: re.Pattern[str] = _COMMA_STRIP) -> str:
    """Whitespace clean-up, punctuation, then digits/articles: the full VQA answer processing."""
    return vqa_process_digit_article(vqa_process_punctuation(_vqa_clean(text), comma_strip))


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: VQANormalize = "official") -> float:
    """VQAv2 accuracy: the mean over leave-one-out subsets of min(#matching other answers / 3, 1).

    `normalize="official"` copies vqaEval.py, including its quirk that answers and prediction are
    only punctuation/digit/article-processed when the references are not all identical (so "Yes"
    scores 0 against ten "yes"; only newlines/tabs and outer whitespace are cleaned).
    `normalize="always"` is lmms-eval's vqav2 scoring: always processed, and its own digit-comma
    regex. With n answers the same arithmetic is used: each of the n answers is left out once, so
    fewer than 4 identical references cannot reach 1.0 and a single reference always scores 0
    (use `exact_match` there). No answers scores 0.
    """
    if normalize not in ("official", "always"):
        raise ConfigError(
            f"vqa_accuracy normalize={normalize!r} is not supported; use 'official' or 'always'"
        )
    references = [_vqa_clean(answer) for answer in answers]
    guess = _vqa_clean(prediction)
    if not references:
        return 0.0
    if normalize == "always" or len(set(references)) > 1:
        comma = _COMMA_STRIP if normalize == "official" else _COMMA_STRIP_LMMS
        references = [vqa_process_digit_article(vqa_process_punctuation(a, comma)) for a in references]
        guess = vqa_process_digit_article(vqa_process_punctuation(guess, comma))
    # vqaEval.py removes the left-out answer by dict identity (each has a unique answer_id), i.e.
    # exactly one answer per subset even when several answers are equal: index-based here.
    accuracies = []
    for left_out in range(len(references)):
        matches = sum(1 for j, answer in enumerate(references) if j != left_out and answer == guess)
        accuracies.append(min(1, float(matches) / 3))
    if normalize == "always":  # lmms-eval averages with statistics.mean (exact), vqaEval.py with sum/len
        return float(statistics.mean(accuracies))
    return float(sum(accuracies)) / len(accuracies)


def vqa_accuracy_always(prediction: str, answers: Sequence[str]) -> float:
    """`vqa_accuracy(normalize="always")`: the number lmms-eval's vqav2 tasks report."""
    return vqa_accuracy(prediction, answers, normalize="always")


# --------------------------------------------------------------------------------------------
# ANLS (DocVQA / InfographicVQA): Biten et al. 2019, eq. 1; the RRC evaluation script.
# --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1), two-row dynamic programme."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, char_b in enumerate(b, start=1):
        current = [j]
        for i, char_a in enumerate(a, start=1):
            cost = 0 if char_a == char_b else 1
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + cost))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Normalised Levenshtein similarity, best over the answers: 1 - NL when NL < threshold, else 0.

    NL = levenshtein / max(len) after lower-casing and collapsing whitespace (both empty: NL = 0).
    At NL == threshold the score is 0, as in the paper and the RRC script; lmms-eval keeps 0.5.
    """
    guess = _anls_normalize(prediction)
    best = 0.0
    for answer in answers:
        reference = _anls_normalize(answer)
        length = max(len(guess.upper()), len(reference.upper()))
        distance = 0.0 if length == 0 else levenshtein(guess, reference) / length
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# --------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy: google-research/pix2struct pix2struct/metrics.py relaxed_correctness
# (the same body as lmms-eval's chartqa utils and Qwen-VL's evaluate_vqa.py).
# --------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """1.0 when both parse as numbers within `tolerance` relative error of the target, else exact
    case-insensitive string match. "12%" parses as 0.12; a zero (or unparsable) target falls back
    to the string match, as in pix2struct; no extra stripping (Python's float ignores outer spaces)."""
    guess, truth = _to_float(prediction), _to_float(target)
    if guess is not None and truth:
        return float(abs(guess - truth) / abs(truth) <= tolerance)
    return float(prediction.lower() == target.lower())


def _relaxed_accuracy_metric(prediction: str, answers: Sequence[str]) -> float:
    """Registered form: best relaxed accuracy over the references (pix2struct aggregate_metrics)."""
    return max((relaxed_accuracy(prediction, answer) for answer in answers), default=0.0)


# --------------------------------------------------------------------------------------------
# Exact match family.
# --------------------------------------------------------------------------------------------


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction equals any reference after trimming and lower-casing."""
    guess = prediction.strip().lower()
    return float(any(guess == answer.strip().lower() for answer in answers))


def helm_normalize_text(text: str, remove_articles: bool = True) -> str:
    """HELM `normalize_text` (from the QuAC scorer): lower, drop ASCII punctuation, drop the words
    a/an/the, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _ASCII_PUNCTUATION)
    if remove_articles:
        text = _HELM_ARTICLES.sub(" ", text)
    return " ".join(text.split())


_ASCII_PUNCTUATION = frozenset(string.punctuation)
_HELM_ARTICLES = re.compile(r"\b(a|an|the)\b")


def quasi_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """HELM quasi_exact_match: normalised texts equal, best over references; empty prediction is 0."""
    if not prediction:
        return 0.0
    guess = helm_normalize_text(prediction)
    return float(any(guess == helm_normalize_text(answer) for answer in answers))


def quasi_prefix_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """HELM quasi_prefix_exact_match: the normalised prediction starts with a normalised reference
    (for models that answer "Yes, because ..."); empty prediction is 0."""
    if not prediction:
        return 0.0
    guess = helm_normalize_text(prediction)
    return float(any(guess.startswith(helm_normalize_text(answer)) for answer in answers))


# --------------------------------------------------------------------------------------------
# BLEU (sacrebleu; the `eval` extra).
# --------------------------------------------------------------------------------------------


def _sacrebleu() -> ModuleType:
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("BLEU needs sacrebleu; install it with `pip install 'vlmkit[eval]'`") from None
    return sacrebleu


def bleu(prediction: str, answers: Sequence[str]) -> float:
    """sacrebleu sentence BLEU-4 (13a tokens, exp smoothing, effective order) / 100, clipped to 1.

    Not HELM's bleu_4 (nltk 4-gram precision only, unsmoothed): see docs/evaluation.md.
    """
    if not answers:
        return 0.0
    score = _sacrebleu().sentence_bleu(prediction, list(answers)).score
    return min(score / 100.0, 1.0)


def _reference_streams(references: Sequence[Sequence[str]], n: int) -> list[list[str | None]]:
    if len(references) != n:
        raise DataError(
            f"{n} predictions but {len(references)} reference lists; pass one list per prediction"
        )
    width = max((len(refs) for refs in references), default=0)
    for index, refs in enumerate(references):
        if not refs:
            raise DataError(
                f"sample {index} has no reference answer; corpus BLEU needs at least one per sample"
            )
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU-4 / 100 (n-gram counts pooled over the corpus, no smoothing)."""
    streams = _reference_streams(references, len(predictions))
    if not predictions:
        raise DataError("no predictions to score")
    score = _sacrebleu().corpus_bleu(list(predictions), streams).score
    return min(score / 100.0, 1.0)


def corpus_bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """Per-sample sufficient statistics of corpus BLEU (lengths and n-gram counts), one row each.

    Summing any subset of rows and passing it to `bleu_from_statistics` gives that subset's corpus
    BLEU, which makes bootstrap intervals of corpus BLEU cheap.
    """
    streams = _reference_streams(references, len(predictions))
    metric = _sacrebleu().BLEU()
    rows = metric._extract_corpus_statistics(list(predictions), streams)
    return np.asarray(rows, dtype=np.int64)


def bleu_from_statistics(statistics: np.ndarray) -> float:
    """Corpus BLEU / 100 from summed `corpus_bleu_statistics` rows."""
    metric = _sacrebleu().BLEU()
    score = metric._compute_score_from_stats([int(value) for value in statistics]).score
    return min(score / 100.0, 1.0)


# --------------------------------------------------------------------------------------------
# HELM's BLEU: stanford-crfm/helm src/helm/benchmark/metrics/evaluate_reference_metrics.py
# `bleu_1` / `bleu_4`, max over references (`compute_metrics_helper`). nltk is the `eval` extra.
# --------------------------------------------------------------------------------------------

#: How `helm_tokenize` split text in this process: "punkt" (HELM's `word_tokenize`, which needs
#: nltk's punkt_tab data) or "treebank" (no punkt data: the same tokenizer without the sentence
#: split first; identical on single-sentence text). Recorded in summary.json.
HELM_TOKENIZER: dict[str, str] = {}


def _nltk() -> ModuleType:
    try:
        import nltk
    except ImportError:
        raise ConfigError("helm_bleu_* needs nltk; install it with `pip install 'vlmkit[eval]'`") from None
    return nltk


def helm_tokenize(text: str) -> list[str]:
    """nltk `word_tokenize(text)` as HELM calls it; without punkt data, `preserve_line=True`."""
    nltk = _nltk()
    mode = HELM_TOKENIZER.get("mode")
    if mode is None:
        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
            mode = "punkt"
        except LookupError:
            mode = "treebank"
            import logging

            logging.getLogger(__name__).warning(
                "nltk punkt_tab data not found: helm_bleu tokenizes without sentence splitting "
                "(equal to HELM on single-sentence answers); `python -m nltk.downloader punkt_tab` adds it"
            )
        HELM_TOKENIZER["mode"] = mode
    return nltk.word_tokenize(text, preserve_line=mode == "treebank")


def _helm_sentence_bleu(gold: str, pred: str, weights: tuple[float, ...]) -> float:
    import warnings

    _nltk()
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():  # nltk warns on every zero n-gram count; HELM ignores it too
        warnings.simplefilter("ignore")
        return float(sentence_bleu([helm_tokenize(gold)], helm_tokenize(pred), weights=weights))


def helm_bleu_1(prediction: str, answers: Sequence[str]) -> float:
    """HELM `bleu_1`: nltk sentence BLEU with weights (1, 0, 0, 0), unsmoothed, max over references."""
    return max((_helm_sentence_bleu(a, prediction, (1, 0, 0, 0)) for a in answers), default=0.0)


def helm_bleu_4(prediction: str, answers: Sequence[str]) -> float:
    """HELM `bleu_4`: weights (0, 0, 0, 1), i.e. the 4-gram precision alone times the brevity
    penalty; below 4 tokens there is no 4-gram and the score is ~0 (nltk's 2.2e-308)."""
    return max((_helm_sentence_bleu(a, prediction, (0, 0, 0, 1)) for a in answers), default=0.0)


# --------------------------------------------------------------------------------------------
# Registries.
# --------------------------------------------------------------------------------------------

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "vqa_accuracy_always": vqa_accuracy_always,
    "anls": anls,
    "relaxed_accuracy": _relaxed_accuracy_metric,
    "quasi_exact_match": quasi_exact_match,
    "quasi_prefix_exact_match": quasi_prefix_exact_match,
    "bleu": bleu,
    "helm_bleu_1": helm_bleu_1,
    "helm_bleu_4": helm_bleu_4,
}

#: Metrics whose corpus score is not the mean of the per-sample scores.
CORPUS_METRICS: dict[str, CorpusMetric] = {"bleu": corpus_bleu}

#: For corpus metrics: per-sample sufficient statistics, and the score of their column sums.
#: Lets reports compute subset scores and bootstrap intervals without re-tokenising.
CORPUS_STATISTICS: dict[
    str,
    tuple[Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray], Callable[[np.ndarray], float]],
] = {"bleu": (corpus_bleu_statistics, bleu_from_statistics)}

DEFAULT_METRIC_FOR_SOURCE: dict[str, str] = {
    "vqav2": "vqa_accuracy",
    "docvqa": "anls",
    "chartqa": "relaxed_accuracy",
    "easyvqa": "exact_match",
}


def get_metric(name: str) -> Metric:
    """The per-sample metric registered as `name`."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; choose one of: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def is_corpus_metric(name: str) -> bool:
    """Whether `name`'s corpus score must be computed with `aggregate` rather than as a mean."""
    return name in CORPUS_METRICS


def aggregate(name: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """The corpus score of `name`: corpus BLEU for "bleu", the mean per-sample score otherwise."""
    metric = get_metric(name)
    if len(predictions) != len(answers_list):
        raise DataError(
            f"{len(predictions)} predictions but {len(answers_list)} answer lists; they must pair up"
        )
    if not predictions:
        raise DataError(f"no predictions to score with {name}")
    if name in CORPUS_METRICS:
        return CORPUS_METRICS[name](predictions, answers_list)
    return float(np.mean([metric(p, a) for p, a in zip(predictions, answers_list, strict=True)]))


def aggregation_of(name: str) -> str:
    """How `name`'s corpus (and every group's) score is formed, in words, for summaries and reports."""
    get_metric(name)
    if name in CORPUS_METRICS:
        return f"corpus {name} of the group's predictions (n-gram counts pooled), not a mean"
    return f"mean of per-sample {name}"


def group_score(
    name: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]], scores: Sequence[float]
) -> float:
    """A group's score, computed exactly as the headline is: `aggregate` for corpus metrics, else
    the mean of the stored per-sample scores."""
    if name in CORPUS_METRICS:
        return aggregate(name, predictions, answers_list)
    if not scores:
        raise DataError(f"no scores to aggregate with {name}")
    return float(np.mean(scores))
