"""The typed run configuration. Attribute docstrings double as the reference for recipe keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Which backbone, which weights, how the head starts."""

    name: str = "vit_b16_clip"
    """Registry name (`gmixout models`), `timm:<name>` or `open_clip:<arch>:<tag>`."""
    weights: str = "pretrained"
    """`pretrained`, `random` (only on explicit request), or a path to a local weight file."""
    head_init: Literal["auto", "zeroshot", "linear_probe", "zero"] = "auto"
    """`auto`: zero-shot text head for CLIP, linear probe for ImageNet backbones."""
    targets: list[str] | None = None
    """Glob patterns on parameter names that GMixout masks; null = the model family's default."""


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
    """The fine-tuning method and its hyperparameters (see docs/METHOD.md)."""

    name: Literal["gmixout", "full", "lp", "lpft", "randmask", "mixout", "lora", "dora", "mlae"] = "gmixout"
    """`gmixout`; baselines: `full` (full fine-tuning), `lp` (linear probe: the head only), `lpft` (full
    fine-tuning from a linear-probe head), `randmask` (one fixed random mask: GMixout with one episode and
    lam=0), `mixout` (the original dense Mixout, a fresh mask every forward), `lora` / `dora` (peft, on the
    same targets), `mlae` (masked LoRA experts; method.p is its coefficient dropout)."""
    p: float = 0.9
    """Mask probability: GMixout trains a fraction 1-p of every target tensor per episode; Mixout's p."""
    k: int | None = None
    """Episode length in optimizer steps (give k or episodes, not both)."""
    episodes: int | None = None
    """Number of episodes; with neither k nor episodes given, 30."""
    lam: float = 0.5
    """EMA coefficient of the anchor fold-in: A <- lam*A + (1-lam)*(A + s*M*delta)."""
    export: Literal["anchor", "last"] = "anchor"
    """What is exported: the final anchor, or the last episode's weights before the fold-in."""
    fold_scale: bool = True
    """Use s = 1/(1-p) in the anchor fold-in."""
    reset_moments: bool = True
    """Reset the AdamW moments of the delta at each episode."""
    mask: Literal["bernoulli", "exact"] = "bernoulli"
    """Bernoulli masks, or exactly round((1-p)*numel) kept entries per tensor."""
    r: int = 8
    """LoRA / DoRA / MLAE rank."""
    alpha: float | None = None
    """LoRA / DoRA / MLAE scale numerator (scale = alpha / r); null = 2r for LoRA and DoRA, r for MLAE."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA / DoRA input."""
    train_bias_norm: bool = False
    """Also train biases and normalisation parameters densely (frozen by default)."""
    norm_stats: Literal["auto", "update", "frozen"] = "auto"
    """BatchNorm running statistics in training: `auto` = the method's own choice (full, lpft, mixout and
    gmixout with train_bias_norm update them; the others keep them frozen), `update`, or `frozen`."""


_SPARSE = frozenset({"p", "k", "episodes", "lam", "export", "fold_scale", "reset_moments", "mask", "train_bias_norm"})
# The `method.*` fields each method reads besides `name` and `norm_stats` (every method reads those): an
# override of any other is refused rather than silently ignored.
METHOD_FIELDS: dict[str, frozenset[str]] = {
    "gmixout": _SPARSE, "randmask": _SPARSE, "mixout": frozenset({"p"}),
    "lora": frozenset({"r", "alpha", "lora_dropout"}), "dora": frozenset({"r", "alpha", "lora_dropout"}),
    "mlae": frozenset({"r", "alpha", "p"}), "full": frozenset(), "lpft": frozenset(), "lp": frozenset(),
}


def unused_method_fields(name: str, fields: list[str]) -> list[str]:
    """Those of `fields` (MethodConfig field names) that method `name` never reads."""
    return [f for f in fields if f not in ("name", "norm_stats") and f not in METHOD_FIELDS[name]]


@dataclass
class Config:
    """A whole run: the YAML recipe plus `key=value` overrides, validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
