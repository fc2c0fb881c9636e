"""An OpenAI chat request -> the Sample an adapter answers and the generation settings it runs with."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vlmkit.data.sample import Message
from vlmkit.serve.errors import bad_request
from vlmkit.serve.schemas import ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from vlmkit.serve.settings import ServeSettings


@dataclass(frozen=True)
class GenerationParams:
    """Settings of one request; `batch_key` says which requests may share one `generate` call.

    `max_new_tokens` may still shrink at admission, once the prompt's length is known (see
    `fit_to_context`); `explicit_max_tokens` says whether the client asked for that many.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    explicit_max_tokens: bool = False

    def batch_key(self, request_id: str) -> tuple[object, ...]:
        """Requests batch only with identical decoding settings (stop strings and logprobs are per row).

        Greedy decoding ignores temperature/top_p/seed, so all greedy requests of one length batch
        together. A seeded sampling request runs alone: the sampled tokens of a row depend on the
        whole batch's random draws, so sharing a batch would make `seed` meaningless.
        """
        shared = (
            self.max_new_tokens,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            self.min_new_tokens,
        )
        if not self.do_sample:
            return (*shared, False)
        return (
            *shared,
            True,
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.n,
            request_id if self.seed is not None else None,
        )

    @property
    def min_new_tokens(self) -> int:
        """`ignore_eos` is "never pick an end token before max_tokens", i.e. min_new_tokens = max_tokens."""
        return self.max_new_tokens if self.ignore_eos else min(self.min_tokens, self.max_new_tokens)

    @property
    def rows_per_request(self) -> int:
        """Rows `generate` returns per request: n for sampling; greedy choices are all the same row."""
        return self.n if self.do_sample else 1

    def generation_options(self) -> dict[str, object]:
        """Extra GenerationConfig fields (transformers' own implementations)."""
        options: dict[str, object] = {}
        if self.rows_per_request > 1:
            options["num_return_sequences"] = self.rows_per_request
        if self.min_new_tokens:
            options["min_new_tokens"] = self.min_new_tokens
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        if self.do_sample and self.top_k > 0:
            options["top_k"] = self.top_k
        if self.do_sample and self.min_p > 0:
            options["min_p"] = self.min_p
        return options

    def fit_to_context(self, prompt_tokens: int, context: int | None) -> GenerationParams:
        """Check prompt + max_tokens against the context: 400 context_length_exceeded, or a default
        max_tokens shortened to what fits (as vLLM does when max_tokens is omitted)."""
        if context is None:
            return self
        room = context - prompt_tokens
        if room < 1 or (self.explicit_max_tokens and self.max_new_tokens > room):
            asked = f" + max_tokens {self.max_new_tokens}" if self.explicit_max_tokens else ""
            raise bad_request(
                f"this model's context is {context} tokens; the prompt has {prompt_tokens}{asked}. "
                "Shorten the conversation" + (" or lower max_tokens" if asked else ""),
                param="messages",
                code="context_length_exceeded",
            )
        if self.max_new_tokens <= room:
            return self
        return replace(self, max_new_tokens=room)


def generation_params(chat: ChatCompletionRequest, settings: ServeSettings) -> GenerationParams:
    unsupported = chat.unsupported_fields()
    if unsupported:
        names = ", ".join(sorted(unsupported))
        raise bad_request(
            f"this server does not implement {names}; remove {'it' if len(unsupported) == 1 else 'them'} "
            "from the request (see docs/serving.md for the fields it reads)",
            param=sorted(unsupported)[0],
            code="unsupported_parameter",
        )
    n = chat.n or 1
    if n > settings.max_n:
        raise bad_request(f"n={n} exceeds this server's max_n of {settings.max_n}", param="n")
    explicit = chat.max_completion_tokens or chat.max_tokens
    max_tokens = explicit or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        raise bad_request(
            f"max_tokens={max_tokens} exceeds this server's cap of {settings.max_tokens_cap}",
            param="max_tokens",
        )
    stop = (chat.stop,) if isinstance(chat.stop, str) else tuple(chat.stop or ())
    if len(stop) > settings.max_stop_strings or any(not s for s in stop):
        raise bad_request(f"stop takes up to {settings.max_stop_strings} non-empty strings", param="stop")
    top_logprobs = chat.top_logprobs or 0
    if top_logprobs and not chat.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    if top_logprobs > settings.max_top_logprobs:
        raise bad_request(
            f"top_logprobs={top_logprobs} exceeds this server's max_top_logprobs of {settings.max_top_logprobs}",
            param="top_logprobs",
        )
    common: dict[str, object] = {
        "max_new_tokens": max_tokens,
        "explicit_max_tokens": explicit is not None,
        "stop": stop,
        "n": n,
        "logprobs": bool(chat.logprobs),
        "top_logprobs": top_logprobs,
        "presence_penalty": chat.presence_penalty or 0.0,
        "frequency_penalty": chat.frequency_penalty or 0.0,
        "repetition_penalty": chat.repetition_penalty if chat.repetition_penalty is not None else 1.0,
        "min_tokens": chat.min_tokens or 0,
        "ignore_eos": bool(chat.ignore_eos),
    }
    temperature = chat.temperature or 0.0
    # temperature omitted or 0 means greedy decoding (the model's own default), not OpenAI's 1.0.
    if temperature == 0.0:
        return GenerationParams(**common)  # type: ignore[arg-type]
    return GenerationParams(
        do_sample=True,
        temperature=temperature,
        top_p=chat.top_p if chat.top_p is not None else 1.0,
        top_k=max(chat.top_k or 0, 0),
        min_p=chat.min_p or 0.0,
        seed=chat.seed,
        **common,  # type: ignore[arg-type]
    )


def _parts(message: ChatMessage, index: int) -> list[TextPart | ImagePart]:
    if message.content is None or isinstance(message.content, str):
        return []
    if message.role != "user" and any(isinstance(part, ImagePart) for part in message.content):
        raise bad_request(
            f"messages[{index}] ({message.role}) has an image; images go in user messages", param="messages"
        )
    return list(message.content)


def conversation(
    chat: ChatCompletionRequest, *, fewest: int = 1, most: int = 1
) -> tuple[list[Message], list[str]]:
    """The messages and the request's image URLs, in order, checked against what the model takes.

    With one image (or none) the turns are plain text and the adapter places the image where
    it was trained to (vlmkit's VLM: before the first user turn), wherever the request put it.
    With several, the turns keep their content parts, so each image stays where the request
    put it (interleaved, for adapters whose processor takes several).
    """
    parts = [_parts(message, index) for index, message in enumerate(chat.messages)]
    urls = [part.image_url.url for message in parts for part in message if isinstance(part, ImagePart)]
    if len(urls) < fewest:
        raise bad_request(
            f"this model answers about {'exactly one image' if most == 1 else 'an image'} per "
            f"conversation; the request has none. "
            'Add a {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} part to a user message',
            param="messages",
            code="image_required",
        )
    if len(urls) > most:
        raise bad_request(
            f"this model takes at most {most} image{'s' if most > 1 else ''} per conversation; "
            f"the request has {len(urls)}",
            param="messages",
            code="too_many_images",
        )
    messages: list[Message] = []
    for message, content in zip(chat.messages, parts, strict=True):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            messages.append({"role": role, "content": message.content})  # type: ignore[typeddict-item]
        elif len(urls) > 1:
            slots: list[Any] = [
                {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
                for part in content
            ]
            messages.append({"role": role, "content": slots})  # type: ignore[typeddict-item]
        else:
            text = "\n".join(part.text for part in content if isinstance(part, TextPart))
            messages.append({"role": role, "content": text})  # type: ignore[typeddict-item]
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be the user's question", param="messages")
    return messages, urls
