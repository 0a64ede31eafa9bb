"""Config parsing: recipes, overrides, types, ranges, every problem reported at once."""

from __future__ import annotations

import pytest

from gmixout_cli.config import build_config, list_recipes, load_config, parse_overrides
from gmixout_cli.errors import UserError


def test_overrides_are_typed_and_nested() -> None:
    raw = parse_overrides(["method.p=0.95", "train.epochs=3", "data.ood=[painting, clipart]", "train.max_steps=null"])
    cfg = build_config(raw)
    assert cfg.method.p == 0.95 and cfg.train.epochs == 3
    assert cfg.data.ood == ["painting", "clipart"] and cfg.train.max_steps is None


def test_comma_list_and_int_to_float() -> None:
    cfg = build_config(parse_overrides(["data.ood=a,b", "train.weight_decay=1", "train.lr=1e-3"]))
    assert cfg.data.ood == ["a", "b"] and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.lr == 1e-3  # YAML 1.1 would leave `1e-3` a string


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(UserError) as exc:
        build_config(parse_overrides(["method.pp=1", "train.lr=abc", "method.p=2", "model.head_init=x",
                                      "train.epochs=true"]))
    msg = str(exc.value)
    assert "5 problems" in msg
    assert "unknown key 'method.pp' (did you mean 'method.p'?)" in msg
    assert "'train.lr' must be a number" in msg
    assert "'method.p' must be in [0, 1)" in msg
    assert "'model.head_init' must be one of auto|zeroshot|linear_probe|zero" in msg
    assert "'train.epochs' must be an integer" in msg
    assert "\n" not in msg


def test_unknown_section_and_k_with_episodes() -> None:
    with pytest.raises(UserError, match="unknown key 'trian'.*did you mean 'train'"):
        build_config({"trian": {"lr": 1e-3}})
    with pytest.raises(UserError, match="'method.k' and 'method.episodes' are both set"):
        build_config({"method": {"k": 5, "episodes": 3}})


def test_bad_override_syntax() -> None:
    with pytest.raises(UserError, match="not key=value"):
        parse_overrides(["method.p"])


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_validates(name: str) -> None:
    cfg = load_config(name, [])
    assert cfg.method.name == name.split("_")[0] or name == "quickstart"


def test_shortcuts_then_overrides_win() -> None:
    cfg = load_config("gmixout", ["model.name=mobilenet_v2"], {"model.name": "efficientnet_lite0", "data.root": "x/y"})
    assert cfg.model.name == "mobilenet_v2" and cfg.data.root == "x/y"


def test_malformed_yaml_and_unknown_recipe(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(str(bad), [])
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        load_config("nope", [])


def test_k_on_the_command_line_replaces_the_recipes_episodes() -> None:
    cfg = load_config("gmixout", ["method.k=10"])
    assert cfg.method.k == 10 and cfg.method.episodes is None
    cfg = load_config("gmixout", ["method.episodes=5"])
    assert cfg.method.episodes == 5 and cfg.method.k is None


def test_a_method_field_the_method_never_reads_is_refused() -> None:
    with pytest.raises(UserError, match=r"method.episodes=5 has no effect with method.name=lora \(read by gmixout, "
                                        r"randmask\): remove it"):
        load_config("lora", ["method.episodes=5"])
    with pytest.raises(UserError, match=r"method.p=0.95 method.r=4 have no effect with method.name=full"):
        load_config("full", ["method.p=0.95", "method.r=4"])
    # The recipe's own values for other methods' fields are fine, and so is what the method reads.
    assert load_config("lora", ["method.r=4", "method.norm_stats=frozen"]).method.r == 4
    assert load_config("gmixout", ["method.name=randmask", "method.episodes=1", "method.lam=0"]).method.lam == 0


def test_every_method_registers_its_own_config() -> None:
    import dataclasses
    import inspect

    from gmixout_cli.config.schema import MethodConfig
    from gmixout_cli.methods.registry import METHODS, method_names

    assert set(method_names()) == {"gmixout", "full", "lp", "lpft", "randmask", "mixout", "lora", "dora", "mlae"}
    signatures = set()
    for name, spec in METHODS.items():
        assert issubclass(spec.config, MethodConfig) and spec.name == name
        assert set(spec.presets) <= {f.name for f in dataclasses.fields(spec.config)}
        assert spec.head_init in (None, "linear_probe", "zero", "zeroshot")
        signatures.add(tuple(inspect.signature(spec.method.__init__).parameters))
    assert signatures == {("self", "model", "cfg", "targets", "head_prefix", "total_steps")}


def test_randmask_is_a_preset_that_works_on_any_recipe() -> None:
    for recipe in ("gmixout", "gmixout_efficientnet_lite0", "full", "lora"):
        m = load_config(recipe, ["method.name=randmask"]).method
        assert (m.name, m.episodes, m.k, m.lam, m.p) == ("randmask", 1, None, 0.0, 0.9)
    with pytest.raises(UserError, match=r"'method.lam' is fixed by method.name=randmask \(episodes=1 k=None "
                                        r"lam=0.0\): remove it"):
        build_config({"method": {"name": "randmask", "lam": 0.5}})
    assert load_config("gmixout", ["method.name=randmask", "method.p=0.8"]).method.p == 0.8


def test_a_recipe_field_its_method_never_reads_is_refused(tmp_path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text("method:\n  name: full\n  episodes: 30\n")
    with pytest.raises(UserError, match=r"'method.episodes' has no effect with method.name=full \(read by gmixout, "
                                        r"randmask\)"):
        load_config(str(recipe), [])


def test_another_method_on_the_command_line_leaves_the_recipes_method_fields_out() -> None:
    with pytest.warns(UserWarning, match=r"method.name=lora: the recipe's episodes, export, k, lam, p belong to its "
                                         r"gmixout settings and are left out"):
        m = load_config("gmixout", ["method.name=lora", "method.r=4"]).method
    assert (m.name, m.r, m.scale_alpha) == ("lora", 4, 8.0)
    m = load_config("lora", ["method.name=dora"]).method  # the same engine: its fields carry over
    assert (m.name, m.r, m.alpha) == ("dora", 8, 16.0)


def test_lpft_declares_its_linear_probe_head_once() -> None:
    from gmixout_cli.methods.registry import method_model_config

    cfg = load_config("lpft", [])
    assert cfg.model.head_init == "auto" and method_model_config(cfg).head_init == "linear_probe"
    with pytest.raises(UserError, match="method.name=lpft starts from a linear_probe head: set model.head_init=auto"):
        load_config("lpft", ["model.head_init=zero"])


def test_config_hash_leaves_out_what_a_resume_may_change() -> None:
    from gmixout_cli.training.checkpoint import RESUME_SETTABLE, config_hash, matching_config_hashes

    base = load_config("quickstart", [])
    runtime = load_config("quickstart", ["data.num_workers=0", "train.eval_batch_size=7", "train.log_every=3",
                                         "train.tensorboard=true", "train.checkpoint_every=5"])
    assert len(RESUME_SETTABLE) == 5 and config_hash(runtime) == config_hash(base)
    assert config_hash(load_config("quickstart", ["train.lr=0.5"])) != config_hash(base)
    # a checkpoint whose hash covered every key (earlier versions) still matches its own config
    import hashlib
    import json

    from gmixout_cli.config import config_to_dict
    legacy = hashlib.sha256(json.dumps(config_to_dict(base), sort_keys=True).encode()).hexdigest()[:16]
    assert matching_config_hashes(base) == {config_hash(base), legacy}
