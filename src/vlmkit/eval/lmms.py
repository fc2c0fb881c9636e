"""lmms-eval interop: run lmms-eval's benchmarks on any vlmkit model folder.

`VlmkitLMMS` implements lmms-eval's `lmms` model API (simple, non-chat models) on top of a
`ModelAdapter`, so every model family vlmkit loads is evaluable there without extra code:

    lmms-eval --model vlmkit --model_args pretrained=runs/my-vlm --tasks vqav2_val_lite

lmms-eval is optional. Without it this module still imports (the class subclasses a small shim
with the same interface, which is what the tests use); with it the class subclasses
`lmms_eval.api.model.lmms` and is registered under "vlmkit" in lmms-eval's legacy registry.
lmms-eval >= 0.7 resolves `--model` through a manifest registry fed by the `lmms_eval.models`
entry-point group: `lmms_eval_manifest` is that entry point's payload, and
`register_with_lmms_eval()` registers it in-process for Python use.

Request layouts (lmms-eval `api/task.py` `construct_requests`, simple models):
  generate_until:             (context, gen_kwargs, doc_to_visual, doc_id, task, split)
  loglikelihood:              (context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)
                              or (context, continuation) for acc_mutual_info's unconditional terms
  generate_until_multi_round: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)
Docs live in `self.task_dict[task][split][doc_id]`, filled in by lmms-eval's evaluator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vlmkit.data.sample import Message, Sample
from vlmkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from vlmkit.models.adapters.base import ModelAdapter

logger = logging.getLogger(__name__)

MODEL_NAME = "vlmkit"
CLASS_PATH = "vlmkit.eval.lmms.VlmkitLMMS"
MAX_ROUNDS = 100  # safety stop for multi-round tasks whose doc_to_text never signals the end

try:
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL = True
except ImportError:  # lmms-eval not installed: a shim with the attributes lmms-eval's base sets
    HAVE_LMMS_EVAL = False

    class _NullCacheHook:
        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            return None

    class _LmmsBase:  # type: ignore[no-redef]
        """Stand-in for `lmms_eval.api.model.lmms` (same constructor state and helpers)."""

        is_simple: bool = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook: Any = _NullCacheHook()
            self.task_dict: dict[str, Any] = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        def set_cache_hook(self, cache_hook: Any) -> None:
            self.cache_hook = cache_hook

        @classmethod
        def create_from_arg_string(
            cls, arg_string: str, additional_config: dict[str, Any] | None = None
        ) -> Any:
            args = dict(item.split("=", 1) for item in arg_string.split(",") if item)
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)


def _one_image(visuals: Any, where: str) -> Any:
    """The single image vlmkit prompts take; lmms-eval gives a list from doc_to_visual."""
    items = [] if visuals is None else list(visuals) if isinstance(visuals, list | tuple) else [visuals]
    if len(items) != 1:
        raise DataError(
            f"{where} has {len(items)} images; vlmkit models take exactly one image per prompt, "
            "so run image tasks with one image per question"
        )
    image = items[0]
    if not hasattr(image, "convert"):  # lmms-eval passes videos as path strings
        raise DataError(f"{where} gives a {type(image).__name__} visual; vlmkit needs a PIL image (no video)")
    return image


def _batch_size(value: int | str | None) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return 1
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"batch_size={value!r} is not a whole number; pass e.g. batch_size=8") from None
    if size < 1:
        raise ConfigError(f"batch_size={size} must be at least 1")
    return size


class VlmkitLMMS(_LmmsBase):
    """An lmms-eval model backed by a vlmkit model folder (any family `load_adapter` opens)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 1,
        max_new_tokens: int | str = 1024,
        max_batch_size: int | None = None,
        adapter: ModelAdapter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(
                f"unknown vlmkit model_args: {', '.join(sorted(kwargs))}; "
                "supported: pretrained, device, dtype, batch_size, max_new_tokens"
            )
        del max_batch_size  # lmms-eval always passes it; batches here are fixed-size
        if adapter is None:
            if not pretrained:
                raise ConfigError("pass --model_args pretrained=DIR with a vlmkit model folder")
            adapter = _load(str(pretrained), device, dtype)
        self.adapter = adapter
        self.adapter.model.eval()
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- helpers ----------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise DataError(
                f"doc {doc_id} of {task}/{split} is not in task_dict; lmms-eval's evaluator fills it, "
                "set model.task_dict[task] = dataset when calling the model directly"
            ) from None

    def _sample(self, context: str, visuals: Any, where: str, continuation: str | None = None) -> Sample:
        messages: list[Message] = [{"role": "user", "content": context}]
        if continuation is not None:
            messages.append({"role": "assistant", "content": continuation})
        return Sample(id=where, image=_one_image(visuals, where), messages=messages)

    def _generation_options(self, gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """lmms-eval generation kwargs -> `ModelAdapter.generate` keywords (greedy by default)."""
        gen = dict(gen_kwargs or {})
        until = gen.get("until")
        stop = [until] if isinstance(until, str) else list(until) if until else None
        temperature = float(gen.get("temperature") or 0.0)
        do_sample = bool(gen.get("do_sample", temperature > 0)) and temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": int(gen.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": do_sample,
            "temperature": temperature if do_sample else 1.0,
            "top_p": float(gen.get("top_p") or 1.0) if do_sample else 1.0,
            "stop": stop,
        }
        num_beams = int(gen["num_beams"]) if gen.get("num_beams") is not None else 1
        if num_beams < 1:
            raise ConfigError(
                f"lmms-eval gen_kwargs num_beams={num_beams}: use 1 (greedy) or more (beam search)"
            )
        if num_beams > 1:  # the model's own beam search; one answer (the best beam) per request
            options["generation_options"] = {"num_beams": num_beams, "num_return_sequences": 1}
        return options

    # -- lmms API ---------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answer each request's context about its image, batching requests with equal gen_kwargs."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items(), key=str)), []).append(index)
        for indices in groups.values():
            options = self._generation_options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                samples = []
                for index in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    where = f"{task}/{split}/{doc_id}"
                    samples.append(
                        self._sample(context, doc_to_visual(self._doc(task, split, doc_id)), where)
                    )
                texts = self.adapter.generate(samples, **options)
                for index, text in zip(chunk, texts, strict=True):
                    results[index] = text
                    context, gen_kwargs = requests[index].args[:2]
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return [text or "" for text in results]

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        """(score, whether greedy decoding would produce the continuation) per request, where the
        score follows the installed lmms-eval's convention (`loglikelihood_convention`): for every
        release up to 0.7.3 the negative log-probability, because its multiple-choice scorer takes
        `np.argmin`; a true log-probability if the installed scorer takes the argmax.

        Under lmms-eval 0.7, whose evaluator would turn these tuples into strings, each comes
        wrapped in a `GenerationResult` whose `.text` is the tuple (see `_loglikelihood_wrapper`).
        """
        sign = -1.0 if loglikelihood_convention() == "negative_logprob" else 1.0
        results = []
        for request in requests:
            args = request.args
            if len(args) == 2:
                raise DataError(
                    "a loglikelihood request without an image (acc_mutual_info's unconditional term) "
                    "cannot be scored by a vlmkit model; drop acc_mutual_info from the task's metrics"
                )
            context, target, doc_to_visual, doc_id, task, split = args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):  # doc_to_target may return a list; score the first
                continuation = continuation[0]
            where = f"{task}/{split}/{doc_id}"
            sample = self._sample(context, doc_to_visual(doc), where, continuation=str(continuation))
            logprob, greedy = continuation_logprob(self.adapter, sample)
            result = (sign * logprob + 0.0, greedy)  # + 0.0: no -0.0 for an empty continuation
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        wrap = _loglikelihood_wrapper()
        return [wrap(result) for result in results] if wrap else results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Rounds as lmms-eval's llava_onevision runs them: round 0 answers the context; later rounds
        get (visuals, context, terminal, previous outputs, info) from doc_to_text until terminal."""
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            options = self._generation_options(gen_kwargs)
            options["stop"] = None  # llava_onevision drops `until` for multi-round tasks
            visuals, outputs, info = doc_to_visual(doc), [], None
            for round_index in range(MAX_ROUNDS + 1):
                if round_index == MAX_ROUNDS:
                    raise DataError(
                        f"{task}/{split}/{doc_id} ran {MAX_ROUNDS} rounds without a terminal signal"
                    )
                if round_index > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_index, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                where = f"{task}/{split}/{doc_id}#round{round_index}"
                outputs.append(self.adapter.generate([self._sample(context, visuals, where)], **options)[0])
            results.append(outputs)
            self.cache_hook.add_partial("generate_until_multi_round", (context, gen_kwargs), outputs)
        return results


def _load(path: str, device: str | None, dtype: str | None) -> ModelAdapter:
    import torch

    from vlmkit.models.adapters import load_adapter

    torch_dtype = None
    if dtype not in (None, "", "auto"):
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_adapter(path, device=device, dtype=torch_dtype)


def continuation_logprob(adapter: ModelAdapter, sample: Sample) -> tuple[float, bool]:
    """Summed log-probability of the last assistant turn's tokens, and whether each is the argmax.

    The adapter's training encoding marks the answer tokens with labels (its own chat template
    and masking). The closing end-of-turn tokens are labelled too; they are not part of the
    continuation string, so trailing stop tokens are left out. One forward pass without labels
    gives logits (vlmkit's VLM returns none when labels are passed); only the positions that
    predict continuation tokens are kept when the model accepts `logits_to_keep`.
    """
    import torch

    batch = adapter.encode([sample], train=True)
    labels = batch.pop("labels")[0]
    input_ids = batch["input_ids"][0]
    positions = [index for index in range(1, labels.shape[0]) if int(labels[index]) != -100]
    stops = set(adapter.stop_token_ids())
    while positions and int(input_ids[positions[-1]]) in stops:
        positions.pop()
    if not positions:
        return 0.0, True
    length = input_ids.shape[0]
    keep = length - (positions[0] - 1)  # logits for positions[0]-1 ... length-1
    batch = {key: value.to(adapter.device) for key, value in batch.items()}
    adapter.model.eval()
    with torch.inference_mode():
        try:
            logits = adapter.model(**batch, logits_to_keep=keep).logits[0]
            offset = length - logits.shape[0]
        except TypeError:  # a model whose forward does not take logits_to_keep
            logits = adapter.model(**batch).logits[0]
            offset = 0
        predicting = torch.tensor(positions, device=logits.device) - 1 - offset
        log_probs = torch.log_softmax(logits[predicting].float(), dim=-1)
        targets = input_ids[positions].to(logits.device)
        total = log_probs.gather(1, targets[:, None]).sum()
        greedy = bool((log_probs.argmax(dim=-1) == targets).all())
    return float(total), greedy


_CONVENTION: dict[str, str] = {}


class _ChoiceProbe:
    """The attributes `ConfigurableTask.process_results` reads for a 2-way multiple-choice doc."""

    OUTPUT_TYPE = "multiple_choice"
    multiple_input = 0
    multiple_target = 0

    def __init__(self) -> None:
        self._metric_fn_list: dict[str, Any] = {"acc": None}

    class config:
        process_results = None

    def doc_to_choice(self, doc: Any) -> list[str]:
        return ["a", "b"]

    def doc_to_target(self, doc: Any) -> int:
        return 0


def loglikelihood_convention() -> str:
    """What the installed lmms-eval's multiple-choice scorer expects from `loglikelihood`.

    "negative_logprob" when it picks the choice with the *smallest* value (`np.argmin`, every
    release up to 0.7.3 at least: its own models return a positive loss), "logprob" when it picks
    the largest. Probed by running the installed `ConfigurableTask.process_results` on a 2-way
    doc whose right answer has the higher log-probability, so a future change is followed; if the
    probe cannot run (no lmms-eval, changed internals) "negative_logprob" is assumed.
    """
    if "value" in _CONVENTION:
        return _CONVENTION["value"]
    convention = "negative_logprob"
    if HAVE_LMMS_EVAL:
        try:
            from lmms_eval.api.task import ConfigurableTask

            process = getattr(
                ConfigurableTask.process_results, "__wrapped__", ConfigurableTask.process_results
            )
            scored = process(_ChoiceProbe(), {}, [(-1.0, False), (-5.0, False)])  # choice 0: more likely
            convention = "logprob" if float(scored["acc"]) == 1.0 else "negative_logprob"
        except Exception as exc:
            logger.warning("could not probe lmms-eval's multiple-choice scorer (%s); returning -log P", exc)
    _CONVENTION["value"] = convention
    return convention


def _loglikelihood_wrapper() -> Callable[[tuple[float, bool]], Any] | None:
    """A wrapper that gets (logprob, is_greedy) through lmms-eval's evaluator unchanged, if needed.

    lmms-eval 0.7 passes every model output through `unwrap_generation_output`, which returns
    `str(output)` for a (float, bool) tuple, so multiple-choice tasks fail on `zip(*results)`.
    A `GenerationResult` is unwrapped to its `.text` as is, so wrapping the tuple survives.
    Probed, not version-checked: when lmms-eval keeps tuples (or is absent) nothing is wrapped.
    """
    if not HAVE_LMMS_EVAL:
        return None
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # older lmms-eval: outputs are stored as returned
        return None
    probe = (-1.0, True)
    if unwrap_generation_output(probe)[0] == probe:
        return None
    return lambda result: GenerationResult(text=result)  # type: ignore[arg-type]


def lmms_eval_manifest() -> Any:
    """Payload of the `lmms_eval.models` entry point ("vlmkit" -> VlmkitLMMS) for lmms-eval >= 0.7."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register_with_lmms_eval() -> None:
    """Make `--model vlmkit` / `get_model("vlmkit")` resolve in this process (no entry point needed)."""
    if not HAVE_LMMS_EVAL:
        raise ConfigError("lmms-eval is not installed; `pip install lmms-eval` to use vlmkit models with it")
    from lmms_eval import models

    models.MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


def _register_legacy() -> None:
    try:
        from lmms_eval.api.registry import register_model
    except ImportError as exc:  # registry imports optional extras (e.g. `evaluate`)
        logger.debug("lmms-eval legacy registry unavailable: %s", exc)
        return
    register_model(MODEL_NAME)(VlmkitLMMS)


if HAVE_LMMS_EVAL:
    _register_legacy()


__all__ = [
    "HAVE_LMMS_EVAL",
    "VlmkitLMMS",
    "continuation_logprob",
    "lmms_eval_manifest",
    "loglikelihood_convention",
    "register_with_lmms_eval",
]
