"""Each Triton kernel (under TRITON_INTERPRET=1 on CPU) against its PyTorch reference."""

from __future__ import annotations

import os

import pytest
import torch

from gmixout_cli.kernels import (
    fold_in_,
    gather_add_,
    mask_seed,
    masks,
    sample_indices,
    sparse_adamw,
    sparse_adamw_,
    sparse_ops,
)


@pytest.fixture
def triton_kernels(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Where the Triton kernels run: CPU tensors under TRITON_INTERPRET=1 (the default in tests, see conftest),
    or a real GPU with `TRITON_INTERPRET=0 pytest tests/test_kernels.py`."""
    pytest.importorskip("triton")
    monkeypatch.setenv("GMIXOUT_KERNELS", "triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and no GPU is visible")
    return torch.device("cuda")


def _sparse_case(numel: int = 3000, p: float = 0.8, seed: int = 0,
                 device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(numel, generator=gen)
    idx = sample_indices(numel, p, mask_seed(seed, 0, 0), torch.device("cpu"))
    nnz = idx.numel()
    vals, grad = torch.randn(nnz, generator=gen) * 0.01, torch.randn(nnz, generator=gen)
    m, v = torch.randn(nnz, generator=gen) * 0.1, torch.rand(nnz, generator=gen) * 0.01
    return tuple(t.to(device) for t in (weight, idx, vals, grad, m, v))


@pytest.mark.parametrize("p,seed", [(0.9, 1), (0.5, 2**40 + 7), (0.0, 3), (0.99, 4)])
def test_mask_kernel_equals_philox_reference(triton_kernels: torch.device, p: float, seed: int) -> None:
    numel = 4099  # not a multiple of the block
    kernel = masks._keep_mask_triton(numel, p, seed, triton_kernels).cpu()
    reference = masks.keep_mask_reference(numel, p, seed, torch.device("cpu"))
    assert torch.equal(kernel, reference)
    assert abs(reference.float().mean().item() - (1 - p)) < 4 * ((p * (1 - p) / numel) ** 0.5) + 1e-9


def test_philox_reference_known_answer_and_exact_mulhilo() -> None:
    # Random123's Philox-4x32-10 known-answer vector: counter (0, 0, 0, 0), key (0, 0) -> 0x6627e8d5 first
    counters = torch.tensor([0])
    assert masks.philox_reference(0, counters).item() == 0x6627E8D5
    assert counters.tolist() == [0]  # the rounds run in place on a copy
    # a * b reaches 2^64 - 2^33 + 1: the int64 product wraps, and the high / low words must still be exact
    a = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF], dtype=torch.int64)
    for b in (masks._ROUND_A, masks._ROUND_B, 0xFFFFFFFF):
        hi, lo = torch.empty_like(a), torch.empty_like(a)
        masks._mulhilo_(a, b, hi, lo)
        assert hi.tolist() == [(x * b) >> 32 for x in a.tolist()]
        assert lo.tolist() == [(x * b) & 0xFFFFFFFF for x in a.tolist()]


def test_sample_indices_sorted_reproducible_and_distinct_per_episode() -> None:
    a = sample_indices(10_000, 0.9, mask_seed(0, 3, 1), torch.device("cpu"))
    assert a.dtype == torch.int32 and torch.equal(a, a.sort().values)
    assert torch.equal(a, sample_indices(10_000, 0.9, mask_seed(0, 3, 1), torch.device("cpu")))
    assert not torch.equal(a, sample_indices(10_000, 0.9, mask_seed(0, 4, 1), torch.device("cpu")))
    exact = sample_indices(10_000, 0.9, 5, torch.device("cpu"), exact=True)
    assert exact.numel() == 1000 and torch.equal(exact, exact.sort().values)


@pytest.mark.parametrize("step,wd", [(1, 0.0), (7, 0.1)])
def test_sparse_adamw_kernel_equals_reference(triton_kernels: torch.device, step: int, wd: float) -> None:
    case_k = _sparse_case(device=triton_kernels)
    case_r = [t.clone() for t in case_k]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, step=step, scale=5.0)
    sparse_adamw_(*case_k, **kw)
    sparse_adamw.sparse_adamw_reference(*case_r, **kw)
    for k, r in zip(case_k, case_r, strict=False):
        torch.testing.assert_close(k, r, rtol=1e-6, atol=1e-7)


def test_sparse_adamw_reference_equals_torch_adamw() -> None:
    """The sparse update of the values is torch.optim.AdamW's, and the weight moves by scale * change."""
    weight, idx, vals, _, _, _ = _sparse_case()
    param = torch.nn.Parameter(vals.clone())
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.05)
    m, v = torch.zeros_like(vals), torch.zeros_like(vals)
    w0 = weight.clone()
    gen = torch.Generator().manual_seed(9)
    for step in range(1, 6):
        grad = torch.randn(vals.numel(), generator=gen)
        param.grad = grad.clone()
        opt.step()
        sparse_adamw.sparse_adamw_reference(weight, idx, vals, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.999,
                                            eps=1e-8, weight_decay=0.05, step=step, scale=3.0)
    torch.testing.assert_close(vals, param.detach(), rtol=1e-5, atol=1e-8)
    expected = w0.clone()
    expected[idx.long()] += 3.0 * (param.detach() - _sparse_case()[2])
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)


def test_gather_and_fold_in_kernels_equal_references(triton_kernels: torch.device) -> None:
    weight, idx, vals, _, _, _ = _sparse_case(numel=5000, device=triton_kernels)
    dense_grad = torch.randn(5000).to(triton_kernels)
    out_k, out_r = vals.clone(), vals.clone()
    gather_add_(dense_grad, idx, out_k, 10.0)
    sparse_ops.gather_add_reference(dense_grad, idx, out_r, 10.0)
    torch.testing.assert_close(out_k, out_r, rtol=1e-6, atol=1e-6)
    w_k, w_r = weight.clone(), weight.clone()
    fold_in_(w_k, idx, vals, -4.5)
    sparse_ops.fold_in_reference(w_r, idx, vals, -4.5)
    torch.testing.assert_close(w_k, w_r, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(5000, dtype=torch.bool, device=triton_kernels)
    untouched[idx.long()] = False
    assert torch.equal(w_k[untouched], weight[untouched])


def test_bf16_weight_kernels_equal_references(triton_kernels: torch.device) -> None:
    """method.weight_dtype=bf16: the AdamW step rewrites W = bf16(anchor + s*delta), the fold-in rounds the new
    anchor stochastically with Philox bits (bit-identical to the reference)."""
    weight, idx, vals, grad, m, v = _sparse_case(numel=5000, device=triton_kernels)
    weight = weight.to(torch.bfloat16)
    anchor = weight[idx.long()].float()
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=3, scale=10.0, anchor=anchor)
    ours = [t.clone() for t in (weight, vals, m, v)]
    ref = [t.clone() for t in (weight, vals, m, v)]
    sparse_adamw_(ours[0], idx, ours[1], grad, ours[2], ours[3], **kw)
    sparse_adamw.sparse_adamw_reference(ref[0], idx, ref[1], grad, ref[2], ref[3], **kw)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert torch.equal(ours[0][idx.long()], (anchor + 10.0 * ours[1]).to(torch.bfloat16))  # from its own delta
    untouched = torch.ones(5000, dtype=torch.bool, device=triton_kernels)
    untouched[idx.long()] = False
    assert torch.equal(ours[0][untouched], weight[untouched])
    w_k, w_r = weight.clone(), weight.clone()
    sparse_ops.fold_in_rounded_(w_k, idx, anchor, vals, 0.7, 2**40 + 3)
    sparse_ops.fold_in_rounded_reference(w_r, idx, anchor, vals, 0.7, 2**40 + 3)
    assert torch.equal(w_k, w_r) and torch.equal(w_k[untouched], weight[untouched])
