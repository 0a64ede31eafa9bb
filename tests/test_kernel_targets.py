"""Every kernel of the sparse engine compiles to real cubins for Ampere, Ada and Hopper on this machine (no GPU),
at the block size and dtypes its wrapper launches, within each architecture's shared-memory and register limits,
without spilling to local memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# Per-block limits (CUDA C Programming Guide, compute capabilities table): opt-in shared memory per block,
# registers per thread and per multiprocessor.
LIMITS = {
    80: {"shared": 163 * 1024, "regs_per_thread": 255, "regs_per_sm": 65536},  # A100
    86: {"shared": 99 * 1024, "regs_per_thread": 255, "regs_per_sm": 65536},  # RTX 30xx, A10
    89: {"shared": 99 * 1024, "regs_per_thread": 255, "regs_per_sm": 65536},  # RTX 40xx, L4, L40
    90: {"shared": 227 * 1024, "regs_per_thread": 255, "regs_per_sm": 65536},  # H100, H200
}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py")), *map(str, LIMITS)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_every_architecture(compiled: list[dict]) -> None:
    kernels = {(r["kernel"], r["launch"]) for r in compiled}
    assert {k for k, _ in kernels} == {"_keep_kernel", "_sparse_adamw_kernel", "_gather_add_kernel", "_fold_in_kernel",
                                       "_fold_in_rounded_kernel"}
    assert ("_sparse_adamw_kernel", "bf16 weight") in kernels  # method.weight_dtype=bf16 launches its own variant
    assert {(k, launch, r["arch"]) for r in compiled for k, launch in [(r["kernel"], r["launch"])]} == {
        (k, launch, cc) for k, launch in kernels for cc in LIMITS}
    assert all(r["cubin_bytes"] > 0 for r in compiled)


@pytest.mark.parametrize("cc", sorted(LIMITS))
def test_resources_fit_the_architecture(compiled: list[dict], cc: int) -> None:
    limit = LIMITS[cc]
    for r in (r for r in compiled if r["arch"] == cc):
        threads = 32 * r["num_warps"]
        assert max(r["SHARED"], r["shared_meta"]) <= limit["shared"], r
        assert r["REG"] <= limit["regs_per_thread"] and r["REG"] * threads <= limit["regs_per_sm"], r
        assert r["LOCAL"] == 0 and r["STACK"] == 0, r  # no register spills
