"""What a result depends on beyond the config: library versions, CPU threads and instruction set, device.

Training is bit-exact only for the same values of all of these (floating-point sums are ordered by
thread count and by the instruction set the kernels pick), so results.json records them.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "peft", "triton", "numpy", "pillow")


def library_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if "torch" in out:
        out["torch"] = torch.__version__  # with its build tag (+cu130, +cpu): which CUDA it runs on
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """The machine facts a run's numbers depend on."""
    facts: dict[str, Any] = {
        "cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(), "versions": library_versions(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts
