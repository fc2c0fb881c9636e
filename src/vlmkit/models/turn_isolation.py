"""Several questions about one image in one row, each seeing the image but not the other turns.

A conversation merged from single questions (`data.*.turns_per_image`) pays for the image tokens
once. Under plain causal attention a later turn could read an earlier answer ("what colour is
it? blue ... is there a blue shape?") instead of the image, a shortcut no test question offers.
With isolation every turn attends to the shared image prefix and to itself only, and its
position ids continue from the prefix, so each turn is computed exactly as a row holding the
image prefix followed by that turn alone: the loss is that of separate questions, at about half
the tokens on easy-VQA.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmkit.models.chat_encoding import IGNORE_INDEX


def turn_segments(labels: list[int], prefix_len: int) -> list[int]:
    """Each token's turn: 0 up to the end of the first answer, then one more after each answer.

    A turn ends with its last labelled token, so the segmentation follows the chat template's own
    label mask. The shared prefix (the image) must end before the first answer.
    """
    segments: list[int] = []
    turn, in_answer = 0, False
    for label in labels:
        labelled = label != IGNORE_INDEX
        if in_answer and not labelled:
            turn += 1
        in_answer = labelled
        segments.append(turn)
    if prefix_len > 0 and segments[prefix_len - 1] != 0:
        raise ValueError("the shared image prefix runs into an answer; place the image before the text")
    return segments


def isolation_inputs(
    segments: list[list[int] | None], prefix_lens: list[int], lengths: list[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (batch, 1, width, width) boolean mask (True: may attend) and position ids for right-padded rows.

    Rows without segments get plain causal attention; each padding slot is a turn of its own, so it
    attends to itself (no softmax row is empty) and nothing real attends to it.
    """
    index = torch.arange(width)
    seg = -1 - index.repeat(len(segments), 1)  # padding: a distinct negative turn per slot
    for row, (segs, n) in enumerate(zip(segments, lengths, strict=True)):
        seg[row, :n] = torch.tensor(segs) if segs is not None else 0
    prefix = torch.tensor(prefix_lens)
    same_turn = seg.unsqueeze(2) == seg.unsqueeze(1)
    sees_prefix = index.view(1, 1, width) < prefix.view(-1, 1, 1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal & (same_turn | sees_prefix)).unsqueeze(1)
    # A later turn's positions continue from the prefix: prefix + offset within the turn.
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    turn_start = torch.where(starts, index, 0).cummax(dim=1).values
    positions = torch.where(seg > 0, prefix.view(-1, 1) + index - turn_start, index)
    return mask, positions


def block_mask(mask: torch.Tensor) -> Any:
    """The (batch, 1, q, k) boolean mask as flex attention's BlockMask.

    Flex attention skips the blocks the mask rules out entirely (a later turn's keys for an
    earlier turn, and the upper triangle), where sdpa and eager compute every score and mask it.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = mask[:, 0]

    def may_attend(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return allowed[b, q, kv]

    batch, _, q_len, kv_len = mask.shape
    return create_block_mask(may_attend, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=str(mask.device))
