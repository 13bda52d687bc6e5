"""Config: dotted overrides, YAML/JSON round trip, error messages, every Table 1 value."""
import json

import pytest

from istr.config import ConfigError, apply_overrides, build_config, dump, from_dict, load, preset_deviations, to_dict

TABLE1 = {
    "model.mask.representation": ["pca", "raw"],
    "model.mask.components": [40, 60, 80, 784],
    "model.matcher.mask_cost": ["none", "dice", "l1", "cosine"],
    "model.loss.mask_loss": ["dice", "l2", "l2+dice"],
    "model.head.interaction": ["dynamic", "multihead"],
    "model.head.init_features": ["max", "avg", "pos", "avg+pos"],
}


def test_dotted_overrides_parse_and_type():
    cfg = build_config("smoke", ["model.mask.components=40", "solver.steps=[10, 20]", "model.backbone.weights=null",
                                 "solver.lr=1e-3", "data.hflip_prob=0"])
    assert cfg.model.mask.components == 40
    assert cfg.solver.steps == (10, 20)
    assert cfg.model.backbone.weights is None
    assert cfg.solver.lr == 1e-3 and isinstance(cfg.data.hflip_prob, float)
    assert cfg.model.head.num_proposals == 50  # the preset still applies underneath
    assert build_config().model.mask.components == 60  # overrides never touch the defaults


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = build_config("tiny", {"model.head.interaction": "multihead", "solver.steps": (3, 5)})
    path = tmp_path / f"cfg{suffix}"
    dump(cfg, path)
    if suffix == ".json":
        json.loads(path.read_text())
    assert load(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.mask.compnents'; did you mean model.mask.components\?"):
        build_config(None, ["model.mask.compnents=40"])
    with pytest.raises(ConfigError, match="did you mean model.head"):
        from_dict({"model": {"haed": {}}})


@pytest.mark.parametrize("override,message", [
    ("model.mask.components=forty", "model.mask.components: expected an integer, got 'forty'"),
    ("solver.lr=fast", "solver.lr: expected a number, got 'fast'"),
    ("model.loss.deep_supervision=maybe", "model.loss.deep_supervision: expected true or false"),
    ("model.head.interaction=conv", "model.head.interaction: 'conv' is not a valid choice"),
    ("model.mask.components=1000", "model.mask.components: 1000 must be in 1..784"),
    ("model.head=3", "model.head is a section"),
    ("solver.lr", "is not of the form key=value"),
])
def test_bad_values_give_one_line_messages(override, message):
    with pytest.raises(ConfigError) as info:
        build_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("key,value", [(k, v) for k, values in TABLE1.items() for v in values])
def test_every_table1_value_is_accepted(key, value):
    cfg = apply_overrides(build_config(), {key: value})
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value


def test_presets_and_deviations():
    deviations = preset_deviations("smoke")
    assert deviations["model.head.proposal_init"] == ("image", "grid")
    assert "model.head.num_stages" not in deviations
    with pytest.raises(ConfigError, match="unknown scale 'huge'"):
        build_config("huge")


def test_a_config_file_sets_only_its_keys_between_preset_and_overrides(tmp_path):
    from istr.train import resolve_config

    path = tmp_path / "partial.yaml"
    path.write_text("model:\n  mask: {components: 40}\n  head: {num_stages: 2}\nsolver: {steps: [10, 20]}\n")
    cfg = resolve_config("smoke", str(path), ["model.head.num_stages=3"])
    assert cfg.model.mask.components == 40 and list(cfg.solver.steps) == [10, 20]
    assert cfg.model.head.num_stages == 3  # the override wins over the file
    assert cfg.model.head.num_proposals == build_config("smoke").model.head.num_proposals  # the preset's, untouched
