"""The two-process half of test_clip's gradient check (a module of its own so a spawned worker can import it)."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlmkit.models.contrastive import contrastive_loss

CASES = [((4, 4), False), ((4, 4), True), ((3, 5), False)]  # (rows per rank, local_loss)


class TinyDual(torch.nn.Module):
    """Two linear 'towers' and a temperature: enough to check the gathered loss's gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(6, 4)
        self.text = torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        return (
            F.normalize(self.image(images), dim=-1),
            F.normalize(self.text(texts), dim=-1),
            self.logit_scale.exp(),
        )


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=generator), torch.randn(n, 5, generator=generator)


def run(rank: int, world: int, port: int, out: str) -> None:
    """Each rank embeds its rows under DDP (which averages gradients) and saves loss + gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results, wrappers = [], []
    for sizes, local_loss in CASES:
        model = TinyDual()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        wrappers.append(ddp)  # freed only at exit, see below
        all_images, all_texts = batch(sum(sizes))
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        loss = contrastive_loss(*ddp(all_images[rows], all_texts[rows]), local_loss=local_loss)
        loss.backward()
        results.append(
            {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        )
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Freeing a DDP Reducer can deadlock in torch's gloo teardown: its destructor joins the gloo
    # worker thread while holding the GIL, and that thread needs the GIL to drop its last Python
    # reference. The results are on disk, so the process leaves without running destructors.
    os._exit(0)
