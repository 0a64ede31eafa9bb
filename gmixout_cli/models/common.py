"""What every backbone builder shares: the BuiltModel record and weight-file helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gmixout_cli.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BuiltModel:
    """A classifier ready to fine-tune, plus what training and export need to know about it."""

    model: nn.Module
    library: str
    arch: str
    family: str
    head: nn.Linear
    head_prefix: str
    head_init: str
    default_targets: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    normalize_features: bool
    extra_meta: dict[str, str] = field(default_factory=dict)
    memory_format: str = "contiguous"  # the layout of its image batches, resolved by set_memory_format

    def features(self, x: Tensor) -> Tensor:
        """Returns exactly what the head sees for `x`, so `model(x) == head(features(x))`.

        A pre-hook on the head captures its input: this holds for every library (pooling,
        dropout and CLIP's normalisation included) without re-implementing their forwards.
        """
        captured: list[Tensor] = []

        def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured.append(args[0])

        handle = self.head.register_forward_pre_hook(grab)
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[0]


def set_memory_format(built: BuiltModel, memory_format: str) -> None:
    """Every forward pass of `built.model` sees its image batch channels_last (`auto`: convolutional networks).

    A forward pre-hook on the model, so training, evaluation, the linear probe's features and DDP all get it
    from one place; the weights stay contiguous, which the sparse engine's flat indices rely on."""
    if memory_format == "contiguous" or (memory_format == "auto" and built.family != "cnn"):
        built.memory_format = "contiguous"
        return
    built.memory_format = "channels_last"
    channels_last_inputs(built.model)


def channels_last_inputs(model: nn.Module) -> None:
    """Makes `model` convert a 4-D input batch to channels_last before its forward (values unchanged)."""

    def to_channels_last(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() != 4:
            return None
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])

    model.register_forward_pre_hook(to_channels_last)


def resolve_weights(weights: str) -> str | Path:
    """Returns "pretrained", "random" or an existing file path for `model.weights`."""
    if weights in ("pretrained", "random"):
        return weights
    path = Path(weights).expanduser()
    if not path.exists():
        raise UserError(
            f"model.weights: file {weights} does not exist; pass an existing checkpoint file, "
            "model.weights=pretrained or model.weights=random"
        )
    if not path.is_file():
        raise UserError(
            f"model.weights: {weights} is not a file; pass a checkpoint file (.pt, .pth, .bin, .safetensors)"
        )
    return path


def pretrained_error(tag: str | None, arch: str, reason: str) -> UserError:
    """The one message for pretrained weights that cannot be had (offline, unknown tag...)."""
    what = f"pretrained weights '{tag}'" if tag else "pretrained weights"
    return UserError(
        f"could not load {what} for {arch}: {short(reason)}; connect to the internet, "
        "pass model.weights=PATH to a local checkpoint, or model.weights=random to train from random weights on purpose"
    )


def short(reason: object, limit: int = 160) -> str:
    """An exception message on one line, clipped so the UserError stays readable."""
    text = " ".join(str(reason).split()) or type(reason).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Reads a state dict from a .safetensors or torch file (weights_only), unwrapping common checkpoint shapes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors all mean "not a readable weight file"
        raise UserError(
            f"could not read weight file {path}: {short(e)}; "
            "pass a PyTorch state dict (.pt/.pth/.bin) or a .safetensors file"
        ) from e
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"weight file {path} does not hold a state dict of tensors; pass a model state dict file")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(
    model: nn.Module, state: dict[str, Tensor], head_prefix: str, path: Path, model_desc: str
) -> None:
    """Loads `state` into `model` strictly except for the classifier, whose keys in the file are dropped.

    The file's classifier has the source task's classes; ours is new, so only it may be missing.
    """
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith(head_prefix + ".")}
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix + ".")}
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            file_shape, model_shape = list(state[k].shape), list(own[k].shape)
            parts.append(f"{len(wrong_shape)} keys of another shape (e.g. {k}: file {file_shape}, model {model_shape})")
        raise UserError(
            f"weight file {path} does not match model {model_desc}: {'; '.join(parts)}; "
            f"pass a checkpoint of {model_desc}"
        )
    model.load_state_dict(state, strict=False)


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """State-dict prefix of `module` inside `model`."""
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise ValueError("module is not part of the model")


def cnn_targets(model: nn.Module, head_prefix: str) -> list[str]:
    """Exact names of every Conv2d (depthwise included) and Linear weight outside the head."""
    names = []
    for name, sub in model.named_modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)) and not (name == head_prefix or name.startswith(head_prefix + ".")):
            names.append(f"{name}.weight")
    return names


def zero_head(head: nn.Linear) -> None:
    """Zeroes the head: the linear-probe start (fitted later by the trainer) and the `zero` start."""
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch for random initialisation without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
