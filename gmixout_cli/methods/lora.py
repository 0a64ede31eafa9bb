"""LoRA / DoRA through the `peft` library (never hand-written), applied to the same targets as GMixout.

Targets are full parameter names. Each one is mapped to the module that owns it (`X.weight` -> `X`;
`X.in_proj_weight` and `X.out_proj.weight` of an nn.MultiheadAttention -> the attention module, which
peft adapts as one layer: it wraps both in_proj and out_proj). Adapters are injected in place with
`peft.inject_adapter_in_model`, so the trainer's reference to the model stays valid. When only one of
an attention module's two projections is a target, the other projection's adapter stays frozen at its
zero init (B = 0), so its delta is exactly zero and it adds nothing.

Trainable: the adapters (lora_A, lora_B and, for DoRA, the magnitude vector) and the head (dense, head_lr);
everything else is frozen and BatchNorm statistics stay fixed.

`finish()` merges every adapter into its base weight with peft's own merge and puts the original modules
back on their parents (peft's own unload path, the one `merge_and_unload` uses, including its special
path for MultiheadAttention), so `model.state_dict()` has exactly the library's keys, in its order.

With the model's default targets (`model.targets: null`), grouped/depthwise convolutions are left out
and their number is shown in the run summary; named explicitly, they are refused.

Unsupported (raised as UserError with the fix): DoRA on nn.MultiheadAttention (peft: "does not support DoRA
yet"), grouped/depthwise convolutions (peft cannot merge them), attention modules with separate q/k/v
weights, and parameters that are not a module's weight (cls tokens, position embeddings, norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gmixout_cli.config.schema import Config
from gmixout_cli.errors import UserError
from gmixout_cli.methods.base import (
    Method,
    RankConfig,
    adamw,
    check_range,
    drop_grouped_convs,
    head_param_names,
    is_bias_or_norm,
    param_orders,
    restore_param_orders,
)
from gmixout_cli.methods.registry import register_method

ADAPTER_NAME = "default"
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def resolve_owners(model: nn.Module, targets: list[str], method: str) -> dict[str, set[str]]:
    """Module name -> the parts targeted there ({"weight"} or a subset of {"in", "out"} for attention)."""
    params = dict(model.named_parameters())
    missing = sorted(set(targets) - set(params))
    if missing:
        raise UserError(f"{method} targets not among the model's parameters: {', '.join(missing[:5])}; "
                        "fix model.targets")
    owners: dict[str, set[str]] = {}
    for name in targets:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
            owners.setdefault(module_name, set()).add("in")
        elif attr == "weight" and child == "out_proj" and isinstance(parent, nn.MultiheadAttention):
            owners.setdefault(parent_name, set()).add("out")
        elif attr == "weight" and isinstance(module, _SUPPORTED) and not isinstance(module, nn.MultiheadAttention):
            owners.setdefault(module_name, set()).add("weight")
        else:
            raise UserError(
                f"{method} cannot adapt target {name} ({type(module).__name__}.{attr}): only Linear/Conv/Embedding "
                "weights and nn.MultiheadAttention in_proj_weight/out_proj.weight are supported; "
                "drop it from model.targets")
    return owners


@dataclass
class LoRAConfig(RankConfig):
    """peft LoRA / DoRA: rank, scale (alpha = 2r by default), input dropout."""

    lora_dropout: float = 0.0
    """Dropout on the adapter input."""

    alpha_per_rank: ClassVar[float] = 2.0

    def problems(self) -> list[str]:
        out = super().problems()
        check_range(out, "lora_dropout", self.lora_dropout, 0.0, 1.0)
        return out


@register_method("lora", LoRAConfig, summary="peft LoRA adapters on the targets, merged at export", lr_scale=3.0)
@register_method("dora", LoRAConfig, summary="peft DoRA adapters on the targets, merged at export", lr_scale=3.0)
class PeftLoRA(Method):
    """LoRA (or DoRA) adapters from peft on the target modules; head trains densely."""

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        super().__init__(model, cfg, targets, head_prefix, total_steps)
        assert isinstance(cfg.method, LoRAConfig)
        r, alpha, dropout = cfg.method.r, cfg.method.scale_alpha, cfg.method.lora_dropout
        use_dora = self.name == "dora"
        lr, head_lr, weight_decay = self.lr, self.head_lr, self.weight_decay
        self.r = r
        self.use_dora = use_dora
        head = set(head_param_names(model, head_prefix))
        in_head = sorted(t for t in targets if t in head)
        if in_head:
            raise UserError(f"{self.name} target {in_head[0]} is in the head ({head_prefix}), which trains densely; "
                            "drop it from model.targets")
        self.skipped_grouped = 0
        if self.default_targets:  # the model's default set (every conv): leave out what peft cannot merge, and say so
            targets, self.skipped_grouped = drop_grouped_convs(model, targets)
        owners = resolve_owners(model, targets, self.name)
        for module_name in owners:
            module = model.get_submodule(module_name)
            if isinstance(module, nn.MultiheadAttention):
                if use_dora:
                    raise UserError(
                        f"dora cannot adapt {module_name} (nn.MultiheadAttention): peft does not support DoRA on "
                        "MultiheadAttention; use method lora, or drop its in_proj_weight/out_proj.weight from "
                        "model.targets")
                if not module._qkv_same_embed_dim:
                    raise UserError(f"{self.name} cannot adapt {module_name}: peft supports MultiheadAttention only "
                                    "with one in_proj_weight; drop it from model.targets")
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1:
                raise UserError(
                    f"{self.name} cannot adapt {module_name}.weight (grouped/depthwise conv, groups={module.groups}): "
                    "peft cannot merge it into the weight; drop it from model.targets")
        self.targets = list(targets)
        self._orders = param_orders(model)
        self._head_names = sorted(head)
        # peft types lora_alpha as int but only divides it by r: a float alpha (2r by default) is exact
        config = PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]
                                target_modules=sorted(owners), use_dora=use_dora, bias="none")
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft's own refusal (e.g. rank vs groups)
            raise UserError(f"{self.name} could not inject adapters: {exc}; change model.targets") from exc
        if hasattr(model, "peft_config"):
            del model.peft_config

        # Freeze everything, then open the adapters of the targeted parts and the head.
        frozen_prefixes = []  # attention projections that are not targets: their adapter stays at zero
        for module_name, parts in owners.items():
            if parts & {"in", "out"}:
                if "in" not in parts:
                    frozen_prefixes += [f"{module_name}.lora_A.", f"{module_name}.lora_B."]
                if "out" not in parts:
                    frozen_prefixes.append(f"{module_name}.base_layer.out_proj.lora_")
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
        self._adapter_names: list[str] = []
        for name, param in model.named_parameters():
            if name in head:
                param.requires_grad_(True)
                groups["head"].append(param)
            elif "lora_" in name and not any(name.startswith(p) for p in frozen_prefixes):
                param.requires_grad_(True)
                groups["no_decay" if is_bias_or_norm(name, param) else "decay"].append(param)
                self._adapter_names.append(name)
            else:
                param.requires_grad_(False)
        self._optimizer = adamw([
            {"params": groups["decay"], "lr": lr, "weight_decay": weight_decay, "name": "adapters"},
            {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0, "name": "adapter_scales"},
            {"params": groups["head"], "lr": head_lr, "weight_decay": weight_decay, "name": "head"},
        ])
        self._adapter_entries = sum(p.numel() for p in groups["decay"] + groups["no_decay"])
        self._adapter_bytes = sum(p.numel() * p.element_size() for p in groups["decay"] + groups["no_decay"])
        self._head_entries = sum(p.numel() for p in groups["head"])
        self._finished = False

    # -- the Method interface -------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def finish(self) -> None:
        """Merge every adapter into its base weight and put the library's own modules back."""
        if self._finished:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        was_training = self.model.training
        self.model.eval()  # DoRA/MHA merges read the layers; no dropout in play either way
        with torch.no_grad():
            # Outermost tuner layers only (MHA's inner out_proj wrapper is unloaded by the MHA itself).
            tuner_names = [n for n, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]
            outer = [n for n in tuner_names if not any(n.startswith(o + ".") for o in tuner_names if o != n)]
            for name in outer:
                layer: Any = self.model.get_submodule(name)  # a peft tuner layer
                if hasattr(layer, "unload_and_optionally_merge_module"):  # peft's path for MultiheadAttention
                    base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
                else:
                    layer.merge(safe_merge=False)
                    base = layer.get_base_layer()
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, base)
        restore_param_orders(self.model, self._orders)
        self.model.train(was_training)
        self._finished = True

    def summary(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "dora": self.use_dora,
            "targets": len(self.targets),
            **({"grouped_convs_left_out": self.skipped_grouped} if self.skipped_grouped else {}),
            "adapter_entries": self._adapter_entries,
            "trainable_entries": self._adapter_entries + self._head_entries,
        }

    def state_bytes(self) -> dict[str, int]:
        return {"adapters": self._adapter_bytes}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        params = dict(self.model.named_parameters())
        return {n: p.detach().clone() for n, p in params.items() if "lora_" in n}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        params = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        if set(params) != set(tensors):
            diff = sorted(set(params) ^ set(tensors))
            raise UserError(f"checkpoint adapters do not match this model's ({', '.join(diff[:3])}); "
                            "resume with the run's own recipe")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n])
