"""The exported classifier: one safetensors file that plain timm/torchvision/open_clip code can rebuild."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from torch import Tensor, nn

from gmixout_cli.errors import UserError
from gmixout_cli.models.common import BuiltModel, channels_last_inputs, short
from gmixout_cli.utils.io import save_safetensors

FORMAT = "gmixout/1"
JSON_FIELDS = ("class_names", "mean", "std", "config", "open_clip_config")
REQUIRED = (
    "format", "library", "arch", "num_classes", "class_names", "image_size", "mean", "std", "normalize_features",
)

_LOAD = """from safetensors import safe_open
from safetensors.torch import load_file
# path = "model.safetensors"
meta = safe_open(path, "pt").metadata()
sd = load_file(path)
"""
_PREPROCESS = """# input: RGB in [0, 1] resized to int(meta["image_size"]),
# normalised with json.loads(meta["mean"]) and json.loads(meta["std"])
"""
REBUILD = {
    "timm": "import json, timm\n" + _LOAD + """\
model = timm.create_model(meta["arch"], pretrained=False, num_classes=int(meta["num_classes"]))
model.load_state_dict(sd)
model.eval()
""" + _PREPROCESS,
    "torchvision": "import json, torchvision\n" + _LOAD + """\
model = torchvision.models.get_model(meta["arch"], weights=None, num_classes=int(meta["num_classes"]))
model.load_state_dict(sd)
model.eval()
""" + _PREPROCESS,
    "open_clip": "import json, open_clip, torch.nn as nn, torch.nn.functional as F\n" + _LOAD + """\
open_clip.factory._MODEL_CONFIGS["rebuilt"] = json.loads(meta["open_clip_config"])
class Classifier(nn.Module):  # logits = head(L2-normalised image embedding)
    def __init__(self):
        super().__init__()
        self.visual = open_clip.create_model("rebuilt").visual
        self.head = nn.Linear(sd["head.weight"].shape[1], sd["head.weight"].shape[0])
    def forward(self, x):
        return self.head(F.normalize(self.visual(x), dim=-1))
model = Classifier()
model.load_state_dict(sd)
model.eval()
""" + _PREPROCESS,
}


def save_classifier(
    path: Path, built: BuiltModel, class_names: list[str], image_size: int, extra: dict[str, str] | None = None
) -> None:
    """Writes the dense classifier (backbone + head, buffers included) as fp32 safetensors, atomically.

    Args:
        path: destination .safetensors file; its folder is created if needed.
        built: the model, whose state-dict keys are the library's own names.
        class_names: label order of the head's outputs.
        image_size: the input resolution the model was trained at.
        extra: more metadata (e.g. the method and its hyperparameters); may not replace the core keys.
    """
    state: dict[str, Tensor] = {}
    for key, value in built.model.state_dict().items():
        value = value.detach().to("cpu")
        # Clones make every tensor own its storage: safetensors refuses shared memory (tied weights).
        state[key] = (value.float() if value.is_floating_point() else value).contiguous().clone()
    meta: dict[str, str] = {str(k): str(v) for k, v in {**built.extra_meta, **(extra or {})}.items()}
    core = {
        "format": FORMAT,
        "library": built.library,
        "arch": built.arch,
        "num_classes": str(built.head.out_features),
        "class_names": json.dumps(list(class_names)),
        "image_size": str(int(image_size)),
        "mean": json.dumps([float(v) for v in built.mean]),
        "std": json.dumps([float(v) for v in built.std]),
        "normalize_features": "true" if built.normalize_features else "false",
        "head_prefix": built.head_prefix,
        "memory_format": built.memory_format,  # the batch layout it trained with; evaluation reuses it
        "rebuild": REBUILD[built.library],
    }
    clash = sorted(set(meta) & set(core))
    if clash:
        raise ValueError(f"extra metadata may not replace core keys: {clash}")
    if len(class_names) != built.head.out_features:
        raise ValueError(f"{len(class_names)} class names for a head with {built.head.out_features} outputs")
    meta.update(core)

    save_safetensors(Path(path), state, meta)  # atomic: readers never see a half-written model


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a gmixout model file, checked.

    Raises:
        UserError: missing file, not safetensors, or not written by save_classifier.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; pass the model.safetensors of a finished run")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise UserError(f"{path} is not a gmixout model file: not a readable safetensors file ({short(e, 80)})") from e
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a gmixout model file: metadata 'format' is not {FORMAT}; pass a file written by gmixout"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{path} is not a gmixout model file: metadata lacks {', '.join(missing)}; re-export the model")
    if meta["library"] not in REBUILD:
        raise UserError(
            f"{path} was written for library '{meta['library']}', which this gmixout cannot rebuild; upgrade gmixout"
        )
    for key in JSON_FIELDS:  # parsed by every reader: a damaged or hostile value is refused here, once
        if key in meta:
            try:
                json.loads(meta[key])
            except (ValueError, RecursionError):
                raise UserError(f"{path} has damaged metadata '{key}': re-export the model") from None
    if meta.get("memory_format", "contiguous") not in ("contiguous", "channels_last"):
        raise UserError(f"{path} has damaged metadata 'memory_format': re-export the model")
    try:
        int(meta["num_classes"]), int(meta["image_size"])
    except ValueError:
        raise UserError(f"{path} has damaged metadata 'num_classes' or 'image_size': re-export the model") from None
    return meta


def load_classifier(path: Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuilds the classifier in a gmixout model file with plain library code, weights loaded strictly.

    Image batches take the layout the model trained with (metadata `memory_format`): the same values,
    channels_last being only faster for convnets.

    Returns:
        The model in eval mode, and the file's metadata.

    Raises:
        UserError: not a gmixout file, or its weights don't fit the architecture it names.
    """
    meta = read_metadata(path)
    from safetensors.torch import load_file

    state = load_file(str(path), device="cpu")
    try:
        model = _rebuild(meta, state)
    except UserError:
        raise
    except Exception as e:  # unknown arch in this library version, bad config JSON...
        raise UserError(
            f"{path}: could not rebuild {meta['library']} {meta['arch']}: {short(e)}; check library versions"
        ) from e
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise UserError(
            f"{path} is not a gmixout model file for {meta['arch']}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(wrong)} reshaped weight keys (e.g. {example}); re-export the model"
        )
    model.load_state_dict(state, strict=True)
    if meta.get("memory_format") == "channels_last":  # files from before the field ran contiguous
        channels_last_inputs(model)
    return model.eval(), meta


def _rebuild(meta: dict[str, str], state: dict[str, Tensor]) -> nn.Module:
    """An untrained module of the file's architecture and class count."""
    library, arch, num_classes = meta["library"], meta["arch"], int(meta["num_classes"])
    if library == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    from gmixout_cli.models.clip import ClipClassifier, create_clip

    if "open_clip_config" not in meta:
        raise UserError(f"gmixout model file for {arch} lacks metadata 'open_clip_config'; re-export the model")
    config = json.loads(meta["open_clip_config"])
    visual = cast(nn.Module, create_clip(config, arch).visual)
    head = nn.Linear(int(config["embed_dim"]), num_classes, bias=True)
    return ClipClassifier(visual, head)

