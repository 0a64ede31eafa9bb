"""The matmul-epilogue gather exploration (benchmarks.epilogue_gather) against its reference."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.bench


def _device() -> torch.device:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and no GPU is visible")
    return torch.device("cuda")


@pytest.mark.parametrize("p", [0.9, 0.5, 0.0])
def test_fused_wgrad_gather_equals_dense_then_gather(p: float) -> None:
    from benchmarks import epilogue_gather as eg

    # 3 x 4 tiles with ragged edges; two accumulating calls; the kept entries come from the mask's seed
    err = eg.check(_device(), torch.float32, tokens=24, out=40, inn=56, p=p, config=(16, 16, 16, 1, 1))
    assert err < 1e-5


def test_block_starts_count_kept_entries_before_each_block() -> None:
    from benchmarks import epilogue_gather as eg

    idx = torch.tensor([0, 3, 4, 9, 10, 11], dtype=torch.int32)  # a 3 x 4 weight, column blocks of 2
    starts = eg.block_starts(idx, rows=3, cols=4, bn=2)
    # flat starts of (row, block): 0 2 | 4 6 | 8 10
    assert starts.tolist() == [[0, 1], [2, 3], [3, 4]]
