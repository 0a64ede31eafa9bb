"""open_clip backbones: the image tower plus a linear head on L2-normalised embeddings."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmixout_cli.config.schema import ModelConfig
from gmixout_cli.errors import UserError
from gmixout_cli.models.common import (
    BuiltModel,
    cnn_targets,
    pretrained_error,
    resolve_weights,
    seeded,
    short,
    zero_head,
)
from gmixout_cli.utils.memory import release_freed_memory

VIT_TARGETS = [
    "visual.transformer.resblocks.*.attn.in_proj_weight",
    "visual.transformer.resblocks.*.attn.out_proj.weight",
    "visual.transformer.resblocks.*.mlp.c_fc.weight",
    "visual.transformer.resblocks.*.mlp.c_proj.weight",
]


class ClipClassifier(nn.Module):
    """CLIP's image tower and a linear head on its L2-normalised embedding.

    Attribute names keep the state-dict keys equal to open_clip's own `visual.*` keys.
    """

    def __init__(self, visual: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """Logits of normalised images `x` [B, 3, H, W]."""
        return self.head(F.normalize(self.visual(x), dim=-1))


def effective_config(arch: str, tag: str | None) -> dict:
    """The arch's open_clip config, with QuickGELU switched on when the tag was trained with it.

    open_clip 3.x only warns when e.g. `ViT-B-16` (GELU) gets the `openai` (QuickGELU) weights,
    which silently degrades them; the tag's own config says which activation is right.
    """
    config = open_clip.get_model_config(arch)
    if config is None:
        raise UserError(
            f"unknown open_clip architecture '{arch}': use one of open_clip.list_models(), "
            "e.g. open_clip:ViT-B-16:openai"
        )
    if tag and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False):
        config["quick_gelu"] = True
    return config


@contextlib.contextmanager
def registered_config(config: dict, name: str) -> Iterator[str]:
    """Registers `config` under a private name for open_clip.create_model, then removes it.

    A private name keeps an exported custom (or QuickGELU-forced) config from shadowing a built-in one.
    """
    key = f"{name}@gmixout"
    open_clip.factory._MODEL_CONFIGS[key] = json.loads(json.dumps(config))
    try:
        yield key
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(key, None)


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's "initialized randomly" warning where random init is asked for or overwritten next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def create_clip(config: dict, arch: str, pretrained: str | None = None) -> nn.Module:
    """open_clip.create_model for `config` (no downloads of tower weights), with `pretrained` a tag or file."""
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip logs through the root logger
    try:
        with registered_config(config, arch) as key:
            # pretrained_hf (alias of 3.x's pretrained_text) keeps HF text towers from downloading weights.
            # the default device: the CPU, or the meta device when `gmixout profile --predict` wants shapes only
            return open_clip.create_model(key, pretrained=pretrained, pretrained_hf=False,
                                          device=torch.get_default_device())
    finally:
        logging.getLogger().removeFilter(quiet)


def build_open_clip(arch: str, tag: str | None, cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
    """Builds an open_clip image classifier; the text tower only makes the zero-shot head, then is dropped."""
    head_init = cfg.head_init  # resolved by build_model
    weights = resolve_weights(cfg.weights)
    config = effective_config(arch, tag)
    if weights == "pretrained":
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        if not tag:
            raise UserError(
                f"open_clip:{arch} needs a pretrained tag: use open_clip:{arch}:<tag> with one of {known}, "
                "or model.weights=PATH / model.weights=random"
            )
        if not open_clip.get_pretrained_cfg(arch, tag):
            raise pretrained_error(tag, arch, f"unknown tag (known tags: {known})")
        try:
            clip = open_clip.create_model(arch, pretrained=tag, force_quick_gelu=bool(config.get("quick_gelu")))
        except Exception as e:  # offline hub, corrupt cache...: all end the same way for the user
            raise pretrained_error(tag, arch, str(e)) from e
    elif weights == "random":
        with seeded(seed):
            clip = create_clip(config, arch)
    else:
        clip = _load_clip_file(config, arch, Path(weights))

    preprocess = getattr(clip.visual, "preprocess_cfg", {})
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    size = getattr(clip.visual, "image_size", preprocess.get("size", 224))
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    head = nn.Linear(int(config["embed_dim"]), len(class_names), bias=True)
    zero_head(head)
    if head_init == "zeroshot":
        _zero_shot_head(clip, arch, head, class_names)
    model = ClipClassifier(clip.visual, head).eval()
    del clip  # frees the text tower
    release_freed_memory()

    if _is_mha_vit(model.visual):
        family, targets = "vit", list(VIT_TARGETS)
    else:  # ResNet or timm towers: mask the convolutions and linears instead
        family, targets = ("vit" if hasattr(model.visual, "transformer") else "cnn"), cnn_targets(model, "head")
    return BuiltModel(
        model=model,
        library="open_clip",
        arch=arch,
        family=family,
        head=head,
        head_prefix="head",
        head_init=head_init,
        default_targets=targets,
        mean=mean,
        std=std,
        image_size=image_size,
        normalize_features=True,
        extra_meta={"open_clip_config": json.dumps(config, sort_keys=True)},
    )


def _load_clip_file(config: dict, arch: str, path: Path) -> nn.Module:
    """A CLIP model with a full local open_clip/OpenAI checkpoint, loaded strictly by open_clip."""
    try:
        return create_clip(config, arch, pretrained=str(path))
    except RuntimeError as e:
        if "state_dict" in str(e) or "size mismatch" in str(e) or "Missing key" in str(e):
            raise UserError(
                f"weight file {path} does not match model open_clip {arch}: {short(e, 200)}; "
                f"pass a full CLIP checkpoint of {arch}"
            ) from e
        raise UserError(f"could not read weight file {path}: {short(e)}; pass a CLIP state dict file") from e
    except Exception as e:  # unpickling / safetensors parse errors
        raise UserError(f"could not read weight file {path}: {short(e)}; pass a CLIP state dict file") from e


def _zero_shot_head(clip: nn.Module, arch: str, head: nn.Linear, class_names: list[str]) -> None:
    """Sets the head to logit_scale * normalised text embeddings of the prompted class names."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    names = [c.replace("_", " ") for c in class_names]
    # 80 templates x C classes through the text tower is slow on CPU; borrow the GPU when there is one.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = open_clip.get_tokenizer(arch)
        clip.to(device).eval()
        weights = build_zero_shot_classifier(
            clip, tokenizer, names, OPENAI_IMAGENET_TEMPLATES, device=device, use_tqdm=False
        )
        scale = cast(Tensor, clip.logit_scale).exp()
    except Exception as e:
        raise UserError(
            f"could not build the zero-shot head for {arch}: {short(e)}; "
            "connect to the internet (tokenizer download) or set model.head_init=linear_probe"
        ) from e
    finally:
        clip.to("cpu")
    with torch.no_grad():
        head.weight.copy_((scale * weights.T).float().cpu())
        head.bias.zero_()


def _is_mha_vit(visual: nn.Module) -> bool:
    """True for open_clip's own VisionTransformer with nn.MultiheadAttention blocks (VIT_TARGETS apply)."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return bool(blocks) and all(hasattr(b, "attn") and hasattr(b.attn, "in_proj_weight") for b in blocks or [])
