"""The one record every source yields and every adapter consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from vlmkit.data.images import ImageLike


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImagePart(TypedDict):
    type: Literal["image"]


#: A turn's content: plain text, or content parts (text and image slots, in order) as in
#: transformers chat templates and TRL's datasets. The n-th image part shows `Sample.images[n]`.
Content = str | list[TextPart | ImagePart]


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: Content


def text_of(message: Message) -> str:
    """A turn's text with its image slots left out (text parts joined as written)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


def image_slots(message: Message) -> int:
    """How many images a turn places explicitly (0 for plain-text content)."""
    content = message["content"]
    return 0 if isinstance(content, str) else sum(part["type"] == "image" for part in content)


@dataclass
class Sample:
    """Images (one, several, or none) with a conversation about them.

    `image` is one image, a list of images, or None (a text-only sample, e.g. LLaVA's ShareGPT
    rows). Where the images go: with plain-text turns, at the start of the first user turn; with
    content-part turns, at their `{"type": "image"}` parts (as many parts as images).
    `messages` alternate user/assistant (an optional system turn first); `answers` holds every
    reference answer for scoring (VQAv2 has ten). `meta` carries per-dataset facts such as
    question_type / answer_type that reports break scores down by.
    """

    id: str
    image: ImageLike | list[ImageLike] | None
    messages: list[Message]
    answers: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def vqa(cls, id: str, image: ImageLike, question: str, answers: list[str], **meta: Any) -> Sample:
        """A question with its reference answers; the first answer is the training target."""
        messages: list[Message] = [{"role": "user", "content": question}]
        if answers:
            messages.append({"role": "assistant", "content": answers[0]})
        return cls(id=id, image=image, messages=messages, answers=list(answers), meta=dict(meta))

    @property
    def images(self) -> list[ImageLike]:
        """Every image of the sample, in the order the conversation shows them."""
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, list) else [self.image]

    @property
    def question(self) -> str:
        """The first user turn's text, the question for VQA-style samples."""
        return next(text_of(m) for m in self.messages if m["role"] == "user")

    def prompt_messages(self) -> list[Message]:
        """The conversation up to the last user turn: what a model is asked to continue."""
        last_user = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        return self.messages[: last_user + 1]
