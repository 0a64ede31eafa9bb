"""Device choice and peak-memory readings (CUDA max allocated, or peak RSS on CPU)."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

import torch

from gmixout_cli.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Current resident set size of this process (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_memory_bytes(torch.device("cpu"))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux `clear_refs`); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    """VmHWM of this process in bytes (the peak since start or since `reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_memory_bytes(torch.device("cpu"))


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`), e.g. after a CLIP text
    tower is dropped: without it the freed tower stays in the process's resident set on CPU."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@contextlib.contextmanager
def oom_advice(batch_size: int, micro_batch_size: int | None) -> Iterator[None]:
    """Turn CUDA out-of-memory into one line with the knobs that help, most effective first."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory (batch {batch_size}, micro-batch {micro_batch_size or batch_size}): "
            f"{oom_knobs(batch_size, micro_batch_size)}; check a setting first with `gmixout profile`"
        ) from None


def oom_knobs(batch_size: int, micro_batch_size: int | None) -> str:
    """The settings that lower peak memory, most effective first."""
    micro = max(1, (micro_batch_size or batch_size) // 2)
    return (f"try, in order, train.micro_batch_size={micro} (same results, gradient accumulation), "
            "train.grad_checkpointing=true, train.precision=bf16, a higher method.p")
