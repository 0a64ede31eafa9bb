"""LoRA / DoRA (through peft) and MLAE: they learn, export the library's own state dict, train only adapters+head."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import build_method
from gmixout_cli.errors import UserError


class TinyAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.fc1(x)))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = torch.relu(self.fc2(h + a))
        return self.head(h.mean(1))


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(self.dw(h)))
        return self.head(h.mean((2, 3)))


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, 8, generator=g) if kind == "attn" else torch.randn(32, 3, 6, 6, generator=g)
    y = (x.flatten(1)[:, :7].sum(1) > 0).long()
    return x, y


# name -> (model class, data kind, targets, constructor)
CASES = {
    "lora": (TinyAttn, "attn", ["fc1.weight", "attn.in_proj_weight", "fc2.weight"],
             lambda m, t: build_method("lora", m, t, r=4, alpha=8, lora_dropout=0.0, lr=1e-2, head_lr=1e-2,
                                       weight_decay=1e-4)),
    "dora": (TinyAttn, "attn", ["fc1.weight", "fc2.weight"],
             lambda m, t: build_method("dora", m, t, r=4, alpha=8, lora_dropout=0.0, lr=1e-2, head_lr=1e-2,
                                       weight_decay=1e-4)),
    "mlae": (TinyAttn, "attn", ["fc1.weight", "attn.in_proj_weight", "fc2.weight"],
             lambda m, t: build_method("mlae", m, t, r=4, p=0.5, lr=1e-2, head_lr=1e-2, weight_decay=1e-4)),
    "lora_conv": (TinyConv, "conv", ["conv1.weight", "conv2.weight"],
                  lambda m, t: build_method("lora", m, t, r=4, alpha=8, lora_dropout=0.1, lr=1e-2,
                                            head_lr=1e-2, weight_decay=1e-4)),
    "mlae_conv": (TinyConv, "conv", ["conv1.weight", "conv2.weight"],
                  lambda m, t: build_method("mlae", m, t, r=8, p=0.25, lr=1e-2, head_lr=1e-2, weight_decay=1e-4,
                                            alpha=8)),
}


@pytest.fixture(scope="module")
def trained() -> dict[str, dict]:
    """Each case trained 60 steps the way the trainer drives a method, then finished."""
    out = {}
    for key, (cls, kind, targets, build) in CASES.items():
        torch.manual_seed(0)
        model = cls()
        original = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method = build(model, targets)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        opt_params = {id(p) for o in method.optimizers() for g in o.param_groups for p in g["params"]}
        opt_names = sorted(n for n, p in model.named_parameters() if id(p) in opt_params)
        x, y = _data(kind)
        losses = []
        for step in range(1, 61):
            method.set_train_mode(model)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            method.after_backward()
            for opt in method.optimizers():
                opt.step()
                opt.zero_grad()
            method.after_step(step)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits_before_finish = model(x)
        method.finish()
        out[key] = dict(model=model, original=original, method=method, losses=losses, x=x, y=y, targets=targets,
                        trainable=trainable, opt_names=opt_names, logits=logits_before_finish)
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_learns(trained: dict, key: str) -> None:
    case = trained[key]
    losses = case["losses"]
    eval_loss = nn.functional.cross_entropy(case["logits"], case["y"]).item()  # eval mode: no (expert) dropout
    assert eval_loss < 0.5 * losses[0], (eval_loss, losses)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("key", list(CASES))
def test_finish_exports_library_state_dict(trained: dict, key: str) -> None:
    case = trained[key]
    model, original = case["model"], case["original"]
    sd, osd = model.state_dict(), original.state_dict()
    assert list(sd) == list(osd)  # the library's own names, in its order
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert not any(type(m).__module__.startswith("peft") or "Parametriz" in type(m).__name__ for m in model.modules())
    heads = {k for k in sd if k.startswith("head.")}
    for k in sd:
        if k in case["targets"]:
            assert not torch.equal(sd[k], osd[k]), k
        elif k not in heads:
            assert torch.equal(sd[k], osd[k]), k  # frozen weights, biases, norms, BN running stats
    fresh = CASES[key][0]()
    fresh.load_state_dict(sd)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(case["x"]), case["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", list(CASES))
def test_only_adapters_and_head_train(trained: dict, key: str) -> None:
    case = trained[key]
    assert case["trainable"] == case["opt_names"]
    for name in case["trainable"]:
        assert name.startswith("head.") or "lora_" in name or ".parametrizations." in name, name
        assert ".original" not in name
    assert {"head.weight", "head.bias"} <= set(case["trainable"])
    adapters = [n for n in case["trainable"] if not n.startswith("head.")]
    assert adapters
    summary = case["method"].summary()
    head_entries = sum(p.numel() for n, p in case["model"].named_parameters() if n.startswith("head."))
    assert summary["trainable_entries"] == summary["adapter_entries"] + head_entries
    assert case["method"].state_bytes()["adapters"] == 4 * summary["adapter_entries"]


def test_lora_attention_adapts_only_targeted_projection(trained: dict) -> None:
    trainable = trained["lora"]["trainable"]
    assert "attn.lora_A.default.weight" in trainable  # in_proj
    assert not any("out_proj" in n for n in trainable)  # out_proj's adapter stays at zero


def test_unsupported_targets_raise_user_error() -> None:
    with pytest.raises(UserError, match="MultiheadAttention"):
        build_method("dora", TinyAttn(), ["attn.in_proj_weight"], r=4, alpha=8, lr=1e-3, weight_decay=0.0)
    with pytest.raises(UserError, match="dw.weight"):
        build_method("lora", TinyConv(), ["dw.weight"], r=8, alpha=8, lr=1e-3, weight_decay=0.0)
    with pytest.raises(UserError, match="dw.weight"):
        build_method("mlae", TinyConv(), ["dw.weight"], r=4, p=0.5, lr=1e-3, weight_decay=0.0)
    with pytest.raises(UserError, match="norm.weight"):
        build_method("lora", TinyAttn(), ["norm.weight"], r=4, alpha=8, lr=1e-3, weight_decay=0.0)
    with pytest.raises(UserError, match="nope"):
        build_method("mlae", TinyAttn(), ["nope.weight"], r=4, p=0.5, lr=1e-3, weight_decay=0.0)


def test_mlae_mask_shared_by_batch_and_scaled() -> None:
    torch.manual_seed(0)
    model = TinyAttn()
    p, r = 0.5, 8
    method = build_method("mlae", model, ["fc1.weight", "attn.in_proj_weight"], r=r, p=p, lr=1e-3, head_lr=1e-3,
                          weight_decay=0.0)
    pm = model.fc1.parametrizations.weight[0]
    pm_attn = model.attn.parametrizations.in_proj_weight[0]
    with torch.no_grad():
        pm.B.normal_()
        pm.c.uniform_(0.5, 1.5)
    w0 = model.fc1.parametrizations.weight.original.detach().clone()
    seen = []

    def grab(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append((args[0].detach(), output.detach()))

    hook = model.fc1.register_forward_hook(grab)
    x, _ = _data("attn")
    masks = set()
    method.set_train_mode(model)
    for _ in range(12):
        attn_mask_reads = []
        handle = model.attn.register_forward_pre_hook(
            lambda m, a, reads=attn_mask_reads: reads.append(pm_attn.mask().clone()))
        model(x)
        handle.remove()
        mask = pm.mask()
        assert set(mask.tolist()) <= {0.0, 1.0 / (1.0 - p)}
        # every sample of the batch went through one and the same W = W0 + B diag(c*m) A (scale alpha/r = 1)
        inp, out = seen[-1]
        w = w0 + (pm.B * (pm.c * mask)) @ pm.A
        torch.testing.assert_close(out, nn.functional.linear(inp, w, model.fc1.bias), rtol=1e-5, atol=1e-5)
        # MHA reads in_proj_weight several times in a forward: one mask for them all
        assert torch.equal(attn_mask_reads[0], pm_attn.mask())
        masks.add(tuple(mask.tolist()))
    assert len(masks) > 1  # a fresh mask each forward
    hook.remove()
    model.eval()  # no dropout at eval: W = W0 + B diag(c) A
    with torch.no_grad():
        w = w0 + (pm.B * pm.c) @ pm.A
        torch.testing.assert_close(model.fc1.weight, w)


@pytest.mark.parametrize("key", ["lora", "dora", "mlae"])
def test_method_state_roundtrip(key: str) -> None:
    cls, _, targets, build = CASES[key]
    torch.manual_seed(0)
    a = cls()
    b = copy.deepcopy(a)
    ma, mb = build(a, targets), build(b, targets)
    with torch.no_grad():
        for _, p in a.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    tensors, values = ma.state_dict()
    assert tensors and all(not t.requires_grad for t in tensors.values())
    mb.load_state_dict(tensors, values)
    tb, vb = mb.state_dict()
    assert values == vb and tensors.keys() == tb.keys()
    assert all(torch.equal(tensors[k], tb[k]) for k in tensors)


@pytest.mark.parametrize("build", [
    lambda m, t: build_method("lora", m, t, r=4, alpha=8, lr=1e-3, weight_decay=0.0, default_targets=True),
    lambda m, t: build_method("mlae", m, t, r=4, p=0.5, lr=1e-3, weight_decay=0.0, default_targets=True),
], ids=["lora", "mlae"])
def test_default_targets_leave_out_depthwise_and_say_so(build) -> None:
    model = TinyConv()
    method = build(model, ["conv1.weight", "dw.weight", "conv2.weight"])
    assert method.targets == ["conv1.weight", "conv2.weight"]
    assert method.summary()["grouped_convs_left_out"] == 1
    assert not model.dw.weight.requires_grad


def test_mlae_conv_update_is_peft_conv_lora() -> None:
    """A conv kernel's update, reshaped from [out, in*kh*kw], acts as conv(A) followed by a 1x1 conv(B)."""
    torch.manual_seed(0)
    model = TinyConv()
    w0 = model.conv1.weight.detach().clone()
    method = build_method("mlae", model, ["conv1.weight"], r=4, p=0.0, lr=1e-3, head_lr=1e-3, weight_decay=0.0,
                          alpha=8)
    pm = method._params[0][2]
    with torch.no_grad():
        pm.B.normal_()
        pm.c.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    a = nn.functional.conv2d(x, pm.A.view(4, 3, 3, 3), padding=1)
    expected = nn.functional.conv2d(x, w0, model.conv1.bias, padding=1) + 2.0 * nn.functional.conv2d(
        a, (pm.B * pm.c).view(8, 4, 1, 1))
    model.eval()
    torch.testing.assert_close(model.conv1(x), expected, atol=1e-5, rtol=1e-5)
