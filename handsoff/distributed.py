"""Running one command on many workers (``torchrun``): process group, sums over workers, global batch norm.

Launched by torchrun (``WORLD_SIZE`` > 1), a stage joins the process group (NCCL on CUDA, gloo on CPU) and splits its
work; launched plainly, every function here is the identity and nothing is initialized. Data-parallel training is
written so that N workers compute what one worker computes with the same global batch: each worker takes its
slice of every global batch, batch statistics and batch-level loss terms are summed over workers (``total``,
differentiable), and DDP averages the gradients.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Workers of this job (1 unless launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (NCCL for CUDA, else gloo)."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the worker that writes shared files and holds output locks."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over all workers, differentiably (the backward pass sums the gradients over workers too);
    ``x`` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


def average(values: dict[str, float]) -> dict[str, float]:
    """Per-key means of plain numbers over workers (for logging what one worker would have logged)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch (every worker's samples), on any device.

    torch's SyncBatchNorm runs on GPUs only; this one sums over workers with ``total`` (gloo on CPU as well), in two
    passes (mean, then squared deviations) for float accuracy. Same parameters and buffers as BatchNorm2d, so state
    dicts are interchangeable; in eval mode it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        xf = x.float()
        count = total(torch.tensor(float(xf.numel() // xf.shape[1]), device=x.device))
        mean = total(xf.sum((0, 2, 3))) / count
        var = total((xf - mean[None, :, None, None]).square().sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * count / (count - 1), m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            global_batch_norm(child)
    return module


class WorkerBatches:
    """Batch sampler: this worker's slice of every global batch of ``sampler`` (same order on every worker)."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, rank: int, world: int):
        self.batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
        self.rank, self.world = rank, world

    def __iter__(self):
        for batch in self.batches:
            share = len(batch) // self.world
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batches)
