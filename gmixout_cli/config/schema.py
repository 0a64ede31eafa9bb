"""The typed run configuration. Attribute docstrings double as the reference for recipe keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HeadInit = Literal["auto", "zeroshot", "linear_probe", "zero"]


@dataclass
class ModelConfig:
    """Which backbone, which weights, how the head starts."""

    name: str = "vit_b16_clip"
    """Registry name (`gmixout models`), `timm:<name>` or `open_clip:<arch>:<tag>`."""
    weights: str = "pretrained"
    """`pretrained`, `random` (only on explicit request), or a path to a local weight file."""
    head_init: HeadInit = "auto"
    """`auto`: zero-shot text head for CLIP, linear probe for ImageNet backbones."""
    targets: list[str] | None = None
    """Glob patterns on parameter names that GMixout masks; null = the model family's default."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Layout of the image batches the network sees: `auto` = channels_last for convolutional networks (about
    1.6x faster EfficientNet-Lite0 and MobileNetV2 training steps on CPU; NHWC convolutions on GPUs), contiguous
    for ViTs. Weights keep their layout; results differ only by float rounding."""


@dataclass
class DataConfig:
    """An ImageFolder domain (ROOT/DOMAIN/<class>/<image>) and its sibling domains."""

    root: str = ""
    """ROOT/DOMAIN of the training domain, or `builtin:digits/mnist` for the quickstart data."""
    ood: list[str] | None = None
    """Sibling domains for out-of-domain evaluation; null = every sibling of the training domain."""
    image_size: int | None = None
    """Input resolution in pixels; null = the model's native resolution."""
    val_fraction: float = 0.1
    """Held-out validation fraction per class, used when no split lists exist."""
    split_seed: int = 0
    """Seed of the held-out split (kept apart from train.seed so every run holds out the same images)."""
    splits: str = "auto"
    """`auto` (ROOT/splits/<domain>_train*.txt and _crossval*.txt when present), `none`, or a folder."""
    hflip: bool = True
    """Random horizontal flips in training (turn off for digits or text)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    """RandomResizedCrop area range in training."""
    num_workers: int = 2
    """Data-loading worker processes."""
    unreadable: Literal["error", "skip"] = "error"
    """Images that cannot be decoded: `error` stops before training and names them; `skip` leaves them out and
    reports how many."""


@dataclass
class TrainConfig:
    """The optimisation budget and loop settings, shared by every method."""

    epochs: int = 10
    """Passes over the training split."""
    max_steps: int | None = None
    """Caps the optimizer steps (null: epochs decide)."""
    batch_size: int = 32
    """Images per optimizer step."""
    micro_batch_size: int | None = None
    """Images per forward/backward pass; batch_size must be a multiple (gradient accumulation). null = batch_size."""
    grad_checkpointing: bool = False
    """Activation checkpointing: recompute block activations in backward to save memory (open_clip and timm)."""
    lr: float = 1e-5
    """Peak learning rate of the backbone parameters (GMixout: of the delta values)."""
    head_lr: float | None = None
    """Peak learning rate of the classification head; null = train.lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (GMixout: pulls the delta towards the anchor)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule over all steps."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip; null = none."""
    seed: int = 0
    """Seed of data order, augmentation, head initialisation and masks."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` = CUDA when available."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision of forward and backward (weights and optimizer state stay fp32)."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl."""
    tensorboard: bool = False
    """Also write the step metrics as TensorBoard scalars under RUN/tensorboard (needs `pip install tensorboard`)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints (null: only on SIGINT/SIGTERM); resume with `gmixout finetune --resume`."""
    deterministic: bool = False
    """Deterministic algorithms only, so a resumed run is bit-identical to an uninterrupted one."""
    eval_batch_size: int = 128
    """Images per evaluation batch."""


@dataclass
class MethodConfig:
    """Fields every method has. Each method extends it with its own typed config, in its own module
    (`gmixout_cli/methods/`), registered by name: `gmixout methods` lists them with their fields
    (docs/METHOD.md specifies each method)."""

    name: str = "gmixout"
    """`gmixout`; baselines: `full`, `lp`, `lpft`, `randmask`, `mixout`, `lora`, `dora`, `mlae`."""
    norm_stats: Literal["auto", "update", "frozen"] = "auto"
    """BatchNorm running statistics in training: `auto` = the method's own choice (every built-in method keeps
    the pretrained statistics; their affine parameters train where the method trains them), `update` (follow
    the training batches), or `frozen`."""

    def problems(self) -> list[str]:
        """Range and consistency checks of the method's own fields (one message per problem)."""
        return []


def _default_method() -> MethodConfig:
    from gmixout_cli.methods.registry import method_spec

    return method_spec(MethodConfig.name).config()


@dataclass
class Config:
    """A whole run: the YAML recipe plus `key=value` overrides, validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=_default_method)
