"""`gmixout profile --predict`: a recipe's CUDA peak memory, predicted on any machine without a GPU.

The product's own training step (method, optimizers, the recipe's batch, micro-batches and activation
checkpointing) runs twice on the meta device, where tensors have shapes and no data, under PyTorch's
`MemTracker`, which follows every tensor's storage from allocation to release and files it as weights,
gradients, optimizer state, activations or transients. The second step's peak is the prediction (the
first one creates the optimizer state). Under bf16 autocast the activations are scaled by the ratio of
the model's saved-activation bytes with and without autocast, measured by a forward pass on fake CUDA
tensors (autocast's own casting rules, which the meta device does not apply). GMixout's bf16 target weights
(method.weight_dtype=bf16) are bf16 on the meta device too, so their bytes, their gradients and the fp32 anchor
values are counted as they are; their absent autocast copies show in the ratio. Autocast also caches its
bf16 copies of trained fp32 weights until the forward pass ends; with activation checkpointing nothing else
holds them, so the forward pass's end (its snapshot plus those copies, counted on the fake tensors) may be
the peak instead of the step's. Not counted: the CUDA
context and library workspaces (`CONTEXT_BYTES`, added to the verdict) and allocator fragmentation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gmixout_cli.config import Config
from gmixout_cli.models import BuiltModel, build_model, resolve_targets
from gmixout_cli.training.loop import input_size, make_trainer

CONTEXT_BYTES = 600 * 2**20
"""CUDA context, cuBLAS/cuDNN workspaces: outside `max_memory_allocated`, inside a card's budget."""
CATEGORIES = {"PARAM": "weights", "BUFFER": "buffers", "GRAD": "gradients", "OPT": "optimizer_state",
              "ACT": "activations", "TEMP": "transient", "OTH": "other"}


class _NoHook:
    def remove(self) -> None:
        """Nothing was registered."""


def _tracker() -> Any:
    """PyTorch's MemTracker, except that it leaves frozen parameters alone (it would hook their gradients)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> Any:
            for p in module.parameters():
                if not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            # a frozen parameter swapped in during a forward pass (peft's LoRA on nn.MultiheadAttention): this
            # module's gradients then count as transients, the total stays exact
            unhooked = any(not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None
                           for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and not unhooked)

        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            # micro-batches call the model again within a step: only the global peak is read, so the per-module
            # statistics that would refuse a second call of the root module are dropped
            name = self._mod_tracker.get_known_fqn(module)
            if (module in self.memory_tracking and not self._mod_tracker.is_bw
                    and set(self._mod_tracker.parents) - {name} == {"Global"}):
                self.memory_tracking.clear()
            super()._pre_fw_hook(module, inputs)

    return Tracker()


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Fused attention on shape-only tensors, as on a GPU (flash / memory-efficient) and on a CPU: the meta
    device would take the math path, which keeps every attention matrix for the backward pass."""
    real = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        if enable_gqa or not (query.is_meta or query.is_cuda and attn_mask is None):
            return real(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if query.is_meta:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@contextlib.contextmanager
def _reference_kernels() -> Iterator[None]:
    """The PyTorch references of the sparse kernels (Triton cannot run on meta tensors)."""
    before = os.environ.get("GMIXOUT_KERNELS")
    os.environ["GMIXOUT_KERNELS"] = "reference"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GMIXOUT_KERNELS", None)
        else:
            os.environ["GMIXOUT_KERNELS"] = before


def _random_model(cfg: Config, classes: int) -> BuiltModel:
    """The recipe's architecture with random weights (no download; the head's values change no memory), on
    the default device: the meta device gives shapes only."""
    model_cfg = dataclasses.replace(cfg.model, weights="random", head_init="zero")
    return build_model(model_cfg, [f"class {i}" for i in range(classes)], cfg.train.seed)


def _meta_model(cfg: Config, classes: int) -> BuiltModel:
    with torch.device("meta"):
        return _random_model(cfg, classes)


def _by_category(snapshot: dict[Any, int]) -> dict[str, int]:
    out = {name: 0 for name in CATEGORIES.values()}
    for kind, value in snapshot.items():
        label = CATEGORIES.get(str(kind).rsplit(".", 1)[-1])
        if label:
            out[label] += int(value)
    return out


def _step_peak(cfg: Config, classes: int) -> tuple[dict[str, int], dict[str, int], dict[str, Any], frozenset[str]]:
    """Bytes by category at the peak of a training step in fp32 on the meta device and at the end of its (last)
    forward pass, the method's summary, and the names of the parameters it trains."""
    built = _meta_model(cfg, classes)
    size = input_size(cfg, built)
    meta = torch.device("meta")
    with _reference_kernels(), _fused_attention():
        trainer = make_trainer(cfg, built, meta, total_steps=1_000_000)  # no episode ends within two steps
        trainer.precision = "fp32"  # the meta device ignores autocast; bf16 is scaled in `predict`
        x = torch.empty(cfg.train.batch_size, 3, size, size, device=meta)
        y = torch.zeros(cfg.train.batch_size, dtype=torch.long, device=meta)
        method_tensors = list(trainer.method.state_dict()[0].values())
        tracker = _tracker()
        tracker.track_external(trainer.model, *trainer.optimizers, *method_tensors, x, y)  # the batch is on the GPU
        with tracker, warnings.catch_warnings():
            # GMixout's own gradient hook has freed a target's dense gradient before the tracker's looks for it
            warnings.filterwarnings("ignore", message="Expected a tensor or a traceable")
            trainer.train_step(x, y)  # creates the optimizer state
            trainer.train_step(x, y)
    from torch.distributed._tools.mem_tracker import _ModState

    peak = _by_category(tracker.get_tracker_snapshot("peak").get(meta, {}))
    forward_ends = tracker.memory_tracking[trainer.model].snapshots.get(_ModState.POST_FW, [])
    forward_end = _by_category(forward_ends[-1].get(meta, {})) if forward_ends else dict.fromkeys(peak, 0)
    trainable = frozenset(name for name, p in trainer.model.named_parameters() if p.requires_grad)
    return peak, forward_end, trainer.method.summary(), trainable


def activation_ratio(cfg: Config, classes: int) -> float:
    """Saved-activation bytes of one forward pass under CUDA bf16 autocast over the same in fp32 (fake CUDA
    tensors: autocast's casting rules apply, nothing is allocated)."""
    return _autocast_forward(cfg, classes)[0]


class _ParamCasts(TorchDispatchMode):
    """Bytes of the bf16 copies autocast makes of trainable fp32 parameters: it caches them until the forward
    pass leaves autocast, whether or not backward saves them."""

    def __init__(self, params: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.params, self.bytes, self.seen = params, 0, set()  # type: ignore[var-annotated]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args and torch.is_tensor(args[0]):
            key = args[0].untyped_storage()._cdata
            param = self.params.get(key)
            if param is not None and key not in self.seen and out.dtype == torch.bfloat16:
                self.seen.add(key)
                self.bytes += out.untyped_storage().nbytes()
        return out


def _autocast_forward(cfg: Config, classes: int, trainable: frozenset[str] = frozenset()) -> tuple[float, int]:
    """`activation_ratio`, and the bytes of autocast's cached bf16 copies of the fp32 parameters named in
    `trainable` (those the method trains: autocast caches casts of leaves that require grad)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    built = _meta_model(cfg, classes)
    size = input_size(cfg, built)
    if cfg.train.grad_checkpointing:
        from gmixout_cli.training.loop import enable_grad_checkpointing

        enable_grad_checkpointing(built, cfg.model.name)
    saved: dict[bool, int] = {}
    batch = cfg.train.micro_batch_size or cfg.train.batch_size
    with FakeTensorMode(allow_non_fake_inputs=True), _fused_attention():
        model = built.model.to_empty(device="cuda")
        model.train()
        for bf16 in (False, True):
            if bf16 and getattr(cfg.method, "weight_dtype", "fp32") == "bf16":  # stored bf16: nothing to cast
                params_by_name = dict(model.named_parameters())
                for name in resolve_targets(built, cfg.model.targets):
                    params_by_name[name].data = params_by_name[name].data.to(torch.bfloat16)
            params = {p.untyped_storage()._cdata for p in model.parameters()}
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor, seen: dict[int, int] = seen, params: set[int] = params) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage._cdata not in params:  # weights are counted as weights; their casts are activations
                    seen[storage._cdata] = storage.nbytes()
                return t

            x = torch.empty(batch, 3, size, size, device="cuda")
            casts = _ParamCasts({p.untyped_storage()._cdata: p for name, p in model.named_parameters()
                                 if name in trainable and p.dtype == torch.float32})
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _cuda_autocast(bf16), casts:
                F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device="cuda"))
            saved[bf16] = sum(seen.values())
            cast_bytes = casts.bytes
    return (saved[True] / saved[False] if saved[False] else 1.0), cast_bytes


@contextlib.contextmanager
def _cuda_autocast(enabled: bool) -> Iterator[None]:
    """CUDA autocast's state, set directly: `torch.autocast("cuda")` turns itself off on a machine without CUDA,
    while fake CUDA tensors follow its rules."""
    if not enabled:
        yield
        return
    before = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
        torch.clear_autocast_cache()


def predict(cfg: Config, classes: int, budget_bytes: int) -> dict[str, Any]:
    """The predicted CUDA peak of one training step of `cfg`, by category, and whether it fits `budget_bytes`."""
    parts, forward_end, summary, trainable = _step_peak(cfg, classes)
    ratio, cast_bytes, peak_at = 1.0, 0, "step"
    if cfg.train.precision == "bf16":
        ratio, cast_bytes = _autocast_forward(cfg, classes, trainable)
        for snapshot in (parts, forward_end):
            snapshot["activations"] = int(snapshot["activations"] * ratio)
            snapshot["transient"] = int(snapshot["transient"] * ratio)
        if cfg.train.grad_checkpointing:
            # autocast keeps its bf16 copies of trained fp32 weights until the forward pass ends; without
            # checkpointing backward saves them (counted in the activations), with it nothing does
            forward_end["transient"] += cast_bytes
            if sum(forward_end.values()) > sum(parts.values()):
                parts, peak_at = forward_end, "forward end"
    peak = sum(parts.values())
    return {"model": cfg.model.name, "method": cfg.method.name, "batch_size": cfg.train.batch_size,
            "micro_batch_size": cfg.train.micro_batch_size, "precision": cfg.train.precision,
            "grad_checkpointing": cfg.train.grad_checkpointing, "classes": classes, "breakdown": parts,
            "bf16_activation_ratio": round(ratio, 4), "autocast_weight_copies_bytes": cast_bytes,
            "peak_at": peak_at, "predicted_peak_bytes": peak,
            "context_bytes": CONTEXT_BYTES, "fits": peak + CONTEXT_BYTES <= budget_bytes,
            "method_summary": summary, "kind": "prediction"}


def measure(cfg: Config, classes: int, device: torch.device) -> int:
    """The measured peak of the second training step of `cfg` with random weights on `device`, what `predict`
    predicts: CUDA's max allocated; on a CPU, the tensors alive at the step's start plus the highest total
    of allocations during it in the profiler's memory view."""
    import json
    import tempfile

    built = _random_model(cfg, classes)
    built.model.to(device)
    size = input_size(cfg, built)
    trainer = make_trainer(cfg, built, device, total_steps=1_000_000)
    x = torch.randn(cfg.train.batch_size, 3, size, size, device=device)
    y = torch.randint(0, classes, (cfg.train.batch_size,), device=device)
    trainer.train_step(x, y)  # the optimizer state exists from here on, as in the prediction's second step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.train_step(x, y)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    alive = [*trainer.model.parameters(), *trainer.model.buffers(), x, y, *trainer.method.state_dict()[0].values(),
             *(v for opt in trainer.optimizers for st in opt.state.values() for v in st.values() if torch.is_tensor(v))]
    before = sum(s.nbytes() for s in {t.untyped_storage()._cdata: t.untyped_storage() for t in alive}.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        trace = f"{tmp}/trace.json"
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    during = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return before + max([0, *during])
