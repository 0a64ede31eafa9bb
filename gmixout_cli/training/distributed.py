"""Several processes, one run: PyTorch's own launcher (`torchrun`), gloo on CPU and NCCL on CUDA.

    torchrun --nproc_per_node 2 -m gmixout_cli finetune --recipe quickstart

`train.batch_size` stays the global batch: every rank takes its slice of each global batch (the same
per-sample seeds as one process), scales its loss by its share of the batch, and the ranks sum their
gradients, so N ranks step exactly like one process with the whole batch. Dense methods synchronise
through DDP (communication overlaps the backward pass); GMixout all-reduces only its sparse delta
gradients and the dense head. Rank 0 alone writes the run folder (logs, checkpoints, export, results)
and evaluates; the run folder must be on a file system every rank sees (a resume reads it everywhere).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gmixout_cli.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; `Dist()` is the ordinary single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and evaluates."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (`LOCAL_RANK`) on CUDA."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.enabled else device

    @property
    def launch(self) -> str:
        """The command that starts (or resumes) a run with this many processes."""
        return f"torchrun --nproc_per_node {self.world} -m gmixout_cli finetune" if self.enabled else "gmixout finetune"

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of `n` samples (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def agree(self, loss: float, stop: bool) -> tuple[float, bool]:
        """One small all-reduce per step: the global loss (each rank holds its share) and whether any rank was
        asked to stop, so that every rank checkpoints and stops after the same step."""
        if not self.enabled:
            return loss, stop
        t = torch.tensor([loss, float(stop)], dtype=torch.float64)  # a CPU tensor: gloo, on any machine
        dist.all_reduce(t)
        return float(t[0]), bool(t[1] > 0)

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (one small all-reduce; the flag itself in one process)."""
        return self.max(int(flag)) > 0

    def max(self, value: int) -> int:
        """The largest of the ranks' `value`s (one small all-reduce; the value itself in one process)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0])

    def barrier(self) -> None:
        """Wait for every rank (e.g. for rank 0's checkpoint before a rank exits and the launcher ends the rest)."""
        if self.enabled:
            dist.all_reduce(torch.zeros(1))  # a CPU tensor, like `agree`: gloo on any machine, no device to guess

    def broadcast_state(self, model: nn.Module) -> None:
        """Every rank starts from rank 0's weights and buffers (a probe head fitted on another GPU may differ in
        its last bits)."""
        if self.enabled:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor.data if isinstance(tensor, nn.Parameter) else tensor, src=0)

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a picklable object)."""
        if not self.enabled:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Dist()
"""The ordinary single process."""


def from_environment() -> Dist:
    """The launcher's rank and world size (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); one process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group() -> Iterator[Dist]:
    """Join the launcher's process group for the block: gloo for CPU tensors, NCCL for CUDA ones where CUDA
    exists (the config, which says where training runs, is only known once rank 0 has read it)."""
    d = from_environment()
    if not d.enabled:
        yield d
        return
    cuda = torch.cuda.is_available()
    if cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {d.local_rank} but this node sees {torch.cuda.device_count()} GPUs: "
                            "set --nproc_per_node to at most the number of GPUs")
        torch.cuda.set_device(d.local_rank)
    # evaluation runs on rank 0 alone while the others wait at the end: a generous timeout
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        yield d
    finally:
        dist.destroy_process_group()


def check_batch(d: Dist, batch_size: int, micro_batch_size: int | None) -> None:
    """The global batch must split evenly over the ranks, and each rank's share over its micro-batches."""
    if batch_size % d.world:
        raise UserError(f"train.batch_size={batch_size} does not split over {d.world} processes: use a multiple "
                        f"of {d.world} (it is the global batch, whatever the number of processes)")
    local = batch_size // d.world
    if micro_batch_size and local % micro_batch_size:
        raise UserError(f"each of the {d.world} processes gets {local} images per step, which "
                        f"train.micro_batch_size={micro_batch_size} does not divide: use a divisor of {local}")


def all_reduce_grads(params: list[torch.Tensor]) -> int:
    """Sum the gradients of `params` over the ranks in one flat buffer per dtype; returns the bytes reduced."""
    grads = [p.grad for p in params if p.grad is not None]
    sent = 0
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        sent += flat.numel() * flat.element_size()
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return sent

