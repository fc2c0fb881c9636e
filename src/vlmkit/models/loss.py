"""The language-model loss at labelled positions only, optionally with a fused linear cross-entropy.

Vocabulary logits are built only for positions whose next token is labelled: a VQA batch labels
a handful of answer tokens per sample, while image and prompt positions are hundreds, and
Gemma's head has 256k outputs. The fused path (liger-kernel) never materialises even those
logits; it needs Triton on a CUDA device, so anywhere else the plain path, which computes the
same quantity, is used.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@functools.cache
def liger_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy imports (it needs Triton)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception:  # ImportError, or Triton failing to find a driver at import
        return False
    return True


def fused_usable(hidden: torch.Tensor, head: nn.Module) -> bool:
    """The fused kernel runs on CUDA tensors with a plain (unquantised, unadapted) linear head whose
    whole weight is on this device: not a ZeRO-3 partition (shape (0,)) or an FSDP2 DTensor shard,
    since the kernel reads `head.weight` without calling the module's gathering hooks."""
    if not (hidden.is_cuda and type(head) is nn.Linear and head.weight.dtype.is_floating_point):
        return False
    if tuple(head.weight.shape) != (head.out_features, head.in_features):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # type: ignore[assignment]
    return not isinstance(head.weight, DTensor) and liger_available()


def softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final logit soft-capping: cap * tanh(logits / cap)."""
    return torch.tanh(logits / cap) * cap if cap else logits


def labelled_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    *,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions, summed and divided by the label count.

    `hidden` is (B, S, D), `labels` (B, S) with -100 where there is no target; the hidden state at
    position t predicts label t+1, as in transformers' causal-LM loss. `num_items_in_batch` (from
    Trainer, for gradient accumulation) replaces the batch's own label count as the divisor.
    With `fused`, liger-kernel computes head + cross-entropy in chunks when it can
    (`fused_usable`); the result equals the plain path up to float rounding.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    selected = hidden[:, :-1][keep]
    wanted = targets[keep]
    if fused and fused_usable(selected, head):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(
            selected,
            head.weight,
            wanted,
            bias=head.bias,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            softcap=softcap or None,
        )
    else:
        logits = softcapped(head(selected), softcap)
        total = F.cross_entropy(logits.float(), wanted, reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator
