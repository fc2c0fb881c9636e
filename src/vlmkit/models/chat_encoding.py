"""Chat text -> token ids + labels, with the label mask derived from the chat template itself.

Each assistant turn's character span is found by rendering the conversation prefix by prefix;
a token carries its label when it starts inside an assistant span (`label_tokens`, the one rule
for vlmkit's own VLM and every transformers family), every other token is -100.
The invariant that every rendered prefix is a prefix of the whole text is asserted, so a chat
template that breaks it fails loudly instead of silently mis-masking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from vlmkit.data.sample import Message
from vlmkit.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class EncodedChat:
    input_ids: list[int]
    labels: list[int] | None


def render(tokenizer: Any, messages: Sequence[Any], generation_prompt: bool) -> str:
    """`tokenizer` is anything with `apply_chat_template`: a tokenizer or a family's processor."""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def template_owner(renderer: Any) -> str:
    tokenizer = getattr(renderer, "tokenizer", renderer)
    return getattr(tokenizer, "name_or_path", None) or "this tokenizer"


def assistant_spans(renderer: Any, messages: Sequence[Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    tokenizer = renderer
    text = render(tokenizer, messages, generation_prompt=False)
    last = len(messages) - 1
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        upto = text if index == last else render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not upto.startswith(before) or not text.startswith(upto):
            raise ConfigError(
                f"the chat template of {template_owner(renderer)} does not render a "
                "conversation as a prefix of its continuation, so answer tokens cannot be located; "
                "set model.tokenizer.chat_template to a template that does"
            )
        turn = upto[len(before) :]
        spans.append((len(before), len(before) + len(turn.rstrip())))
    return text, spans


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    train: bool,
) -> EncodedChat:
    """Token ids of the conversation (train) or of its prompt with a generation prompt (inference)."""
    if not train:
        text = render(tokenizer, messages, generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return EncodedChat(input_ids=list(ids), labels=None)
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = label_tokens(encoded["input_ids"], encoded["offset_mapping"], spans)
    return EncodedChat(input_ids=list(encoded["input_ids"]), labels=labels)


def label_tokens(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """The one label-mask rule: a token is labelled when it starts inside an assistant span.

    A token that runs past the span's end (a merge with the template's trailing space) is kept,
    so the whole answer is learnt; zero-width tokens (BOS added by the tokenizer) never are.
    """
    labels = [IGNORE_INDEX] * len(ids)
    hits = [0] * len(spans)
    for position, (token_id, (start, end)) in enumerate(zip(ids, offsets, strict=True)):
        if end <= start:
            continue
        for index, (span_start, span_end) in enumerate(spans):
            if span_start <= start < span_end:
                labels[position] = token_id
                hits[index] += 1
                break
    if spans and min(hits) == 0:
        raise ValueError("an assistant turn tokenized to no labelled tokens")
    return labels


def end_of_turn_text(renderer: Any, tokenizer: PreTrainedTokenizerBase, parts: bool = True) -> list[str]:
    """The special tokens that close an assistant turn in this template (Qwen: <|im_end|>), found
    by rendering a probe; empty for a template that closes turns with plain text (LLaVA-1.5)."""
    user: Any = [{"type": "text", "text": "q"}] if parts else "q"
    answer: Any = [{"type": "text", "text": "a"}] if parts else "a"
    text, spans = assistant_spans(
        renderer, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    )
    start, end = spans[0]
    ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        index for index, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return [str(token) for token in tokenizer.convert_ids_to_tokens([t for t in ids if t in special])]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens that close an assistant turn in this template: what generation stops on."""
    stops = [
        int(tokenizer.convert_tokens_to_ids(t)) for t in end_of_turn_text(tokenizer, tokenizer, parts=False)
    ]
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    return sorted(set(stops))
