"""Settings: one validated source for UI labels, API keys, infotext keys and X/Y/Z axes."""
from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from lib_consistency.settings import (DEFAULT_PRESET, PRESETS, Settings, SettingsError, axis_keys, axis_label,
                                      infotext_key, option, option_keys)

# The key pattern of the hosts' infotext parser (modules/infotext_utils.py re_param_code).
HOST_INFOTEXT_KEY = re.compile(r"^\w[\w \-/]+$")


def random_settings(rng: random.Random) -> Settings:
    values = {}
    for key in option_keys():
        f = next(f for f in dataclasses.fields(Settings) if f.name == key)
        opt = option(key)
        if opt.choices:
            values[key] = rng.choice(opt.choices)
        elif f.type == "bool":
            values[key] = rng.random() < 0.5
        elif f.type == "int":
            values[key] = rng.randint(int(opt.minimum), int(opt.maximum))
        elif f.type == "float":
            values[key] = round(rng.uniform(opt.minimum, opt.maximum), rng.randint(1, 6))
        else:
            values[key] = rng.choice(["", "hero\nrides, fast: \"quoted\"", '{"identity": "x", "frames": ["y"]}'])
    values["consolidate"] = values["consolidate"] or values["reweighting"] != "none" or values["ipca"]
    values["csa"] = values["csa"] or values["masked_sharing"]
    if 0 < values["frames_per_batch"] < values["reference_frames"]:
        values["reference_frames"] = values["frames_per_batch"]
    values["rfh_start"], values["rfh_end"] = sorted((values["rfh_start"], values["rfh_end"]))
    return Settings(**values)


def test_every_field_is_described_once():
    keys = option_keys()
    assert keys[:6] == ("enabled", "preset", "story", "frames_per_batch", "seed_mode", "storyboard")
    names = [option(k).name for k in keys]
    assert len(set(names)) == len(names) and len(set(map(str.lower, names))) == len(names)
    for key in keys:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", key)
        assert HOST_INFOTEXT_KEY.match(infotext_key(key)) and infotext_key(key).startswith("Story ")
        assert option(key).label
    assert "story" not in axis_keys() and "preset" in axis_keys()
    assert axis_label("csa_rate") == "[Story] CSA rate"


def test_defaults_are_the_default_preset():
    defaults = Settings()
    assert defaults.preset == DEFAULT_PRESET
    for key, value in PRESETS[DEFAULT_PRESET].items():
        assert getattr(defaults, key) == value
    assert Settings.from_dict({}) == defaults == Settings.from_args([])


@pytest.mark.parametrize("seed", range(40))
def test_round_trips(seed):
    s = random_settings(random.Random(seed))
    info = s.to_infotext()
    assert all(isinstance(v, str) for v in info.values())
    assert Settings.from_infotext(info) == s
    assert Settings.from_infotext({**info, "Steps": "20", "Story Unknown future key": "1"}) == s
    assert Settings.from_args(s.to_args()) == s
    assert Settings.from_dict(s.to_dict()) == s
    assert Settings.from_args([s.to_dict()]) == s
    assert Settings.from_args([s.to_dict(), *Settings().to_args()[1:]]) == s  # host-filled defaults ignored
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_bools_are_written_the_way_the_hosts_paste_them():
    info = Settings(enabled=True).to_infotext()
    assert info["Story Enabled"] == "True" and info["Story CSA"] == "False"


def test_preset_fills_omitted_keys_and_explicit_keys_win():
    s = Settings.from_dict({"preset": "StoryDiffusion", "csa_rate": 0.25})
    assert s.csa and not s.consolidate and s.reweighting == "none" and s.csa_rate == 0.25
    combined = Settings.from_dict({"preset": "Combined"})
    assert combined.csa and combined.consolidate and combined.ipca
    custom = Settings.from_dict({"preset": "Custom", "csa": True})
    assert custom.csa and custom.consolidate  # Custom keeps defaults for everything not given
    assert Settings().with_preset("StorySync").masked_sharing
    assert Settings(preset="Custom").with_value("preset", "StoryDiffusion").csa


def test_positional_args_keep_values_as_given():
    args = Settings().to_args()
    args[option_keys().index("csa")] = True
    s = Settings.from_args(args)
    assert s.csa and s.preset == DEFAULT_PRESET  # the UI already applied the preset; no re-application


@pytest.mark.parametrize("values, field, message", [
    ({"bogus": 1}, "bogus", "unknown key; valid keys: enabled, preset"),
    ({"csa_rate": 1.5}, "csa_rate", r"1.5 is out of range \[0.0, 1.0\]"),
    ({"csa_rate": "fast"}, "csa_rate", "expected a number, got 'fast'"),
    ({"csa_rate": float("nan")}, "csa_rate", "expected a number"),
    ({"csa_rate": True}, "csa_rate", "expected a number, got True"),
    ({"window": 2.5}, "window", "expected a whole number, got 2.5"),
    ({"window": 0}, "window", "out of range"),
    ({"frames_per_batch": 65}, "frames_per_batch", "out of range"),
    ({"enabled": "maybe"}, "enabled", "expected true or false, got 'maybe'"),
    ({"enabled": 2}, "enabled", "expected true or false"),
    ({"seed_mode": "random"}, "seed_mode", "'random' is not one of same, sequential"),
    ({"preset": "Mine"}, "preset", "'Mine' is not one of 1Prompt1Story"),
    ({"eot_mode": 3}, "eot_mode", "expected text, got int"),
    ({"story": ["ok", 3]}, "story[1]", "expected a line of text, got int"),
    ({"consolidate": False, "reweighting": "svr", "ipca": False}, "reweighting", "turn 'consolidate' on"),
    ({"consolidate": False, "reweighting": "none", "ipca": True}, "ipca", "identity tokens"),
    ({"masked_sharing": True, "csa": False}, "masked_sharing", "turn 'csa' on"),
    ({"frames_per_batch": 2, "reference_frames": 3}, "reference_frames", "first batch of 2 frames"),
])
def test_errors_name_the_field_and_the_problem(values, field, message):
    with pytest.raises(SettingsError, match=message) as info:
        Settings.from_dict(values)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


def test_argument_container_errors():
    with pytest.raises(SettingsError, match="at most"):
        Settings.from_args([False] * 100)
    with pytest.raises(SettingsError, match="expected a dict"):
        Settings.from_dict(["enabled"])
    with pytest.raises(SettingsError, match="Story CSA rate") as info:
        Settings.from_infotext({"Story CSA rate": "lots"})
    assert info.value.field == "Story CSA rate"


def test_coercion_of_api_values():
    s = Settings.from_dict({"enabled": "true", "csa_rate": "0.75", "frames_per_batch": "4", "window": 3.0,
                            "storyboard": 0, "preset": "Combined"})
    assert (s.enabled, s.csa_rate, s.frames_per_batch, s.window, s.storyboard) == (True, 0.75, 4, 3, False)
    as_json = Settings.from_dict({"story": {"identity": "a fox", "frames": ["runs"]}}).story
    assert json.loads(as_json) == {"identity": "a fox", "frames": ["runs"]}
    assert Settings.from_dict({"story": ["a fox", "runs"]}).story == "a fox\nruns"


def test_direct_construction_is_validated_too():
    with pytest.raises(SettingsError, match="expected float"):
        Settings(csa_rate="0.5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().csa_rate = 0.1


def test_with_value_checks_like_the_api():
    assert Settings().with_value("csa_rate", "0.2").csa_rate == 0.2
    with pytest.raises(SettingsError, match="unknown key"):
        Settings().with_value("nope", 1)
    with pytest.raises(SettingsError, match="out of range"):
        Settings().with_value("ipca_dropout", 3)


def test_storysync_options_are_appended_after_the_original_28():
    keys = option_keys()
    assert keys[24:28] == ("masked_sharing", "mask_dropout", "rfh_strength", "bli_strength")
    assert keys[28:36] == ("share_dropout", "rfh_dropout", "rfh_start", "rfh_end", "bli_steps", "bli_inputs",
                           "bli_cache_on_cpu", "show_masks")
    assert all(option(k).group == "StorySync" for k in keys[24:36])
    with pytest.raises(SettingsError, match="'rfh_end': 0.05 ends the RFH window before it starts"):
        Settings(rfh_start=0.1, rfh_end=0.05)
    storysync = Settings().with_preset("StorySync")
    assert storysync.csa_layers == "up" and storysync.masked_sharing and storysync.csa_rate == 1.0


def test_oneactor_options_are_appended_after_storysync():
    keys = option_keys()
    assert keys[36:41] == ("oneactor_preset", "oneactor_v", "oneactor_eta2", "oneactor_window", "oneactor_cfg")
    assert all(option(k).group == "OneActor" for k in keys[36:41])
    assert {axis_label("oneactor_v"), axis_label("oneactor_eta2")} <= {axis_label(k) for k in axis_keys()}


def test_bli_lockstep_is_appended_last_and_off_by_default():
    keys = option_keys()
    assert keys[41:] == ("bli_lockstep",) and option("bli_lockstep").group == "StorySync"
    assert Settings().bli_lockstep is False and Settings().with_preset("StorySync").bli_lockstep is False
    on = Settings.from_dict({"preset": "StorySync", "bli_lockstep": True})
    assert on.to_infotext()["Story BLI lock-step"] == "True"
    assert Settings.from_infotext(on.to_infotext()).bli_lockstep is True
    assert Settings.from_args(Settings().to_args()[:41]).bli_lockstep is False  # an older API call's positions
    with pytest.raises(SettingsError, match="bli_lockstep"):
        Settings.from_dict({"bli_lockstep": "sometimes"})


def test_oneactor_presets_fill_only_oneactor_keys():
    paper = Settings.from_dict({"oneactor_preset": "paper"})
    assert (paper.oneactor_cfg, paper.oneactor_eta2, paper.oneactor_v) == (8.5, 1.0, 0.8)
    assert paper.to_dict() | {k: getattr(Settings(), k) for k in ("oneactor_preset", "oneactor_cfg",
                                                                   "oneactor_eta2")} == Settings().to_dict()
    explicit = Settings.from_dict({"oneactor_preset": "paper", "oneactor_eta2": 0.5})
    assert explicit.oneactor_eta2 == 0.5 and explicit.oneactor_cfg == 8.5
    back = paper.with_value("oneactor_preset", "fast")
    assert (back.oneactor_cfg, back.oneactor_eta2) == (0.0, 0.0)
    kept = Settings(oneactor_eta2=2.0).with_value("oneactor_preset", "custom")
    assert kept.oneactor_eta2 == 2.0 and kept.oneactor_preset == "custom"
    with pytest.raises(SettingsError, match="'oneactor_preset': 'slow' is not one of fast, paper, custom"):
        Settings.from_dict({"oneactor_preset": "slow"})
    with pytest.raises(SettingsError, match="'oneactor_eta2'.*out of range"):
        Settings.from_dict({"oneactor_eta2": 11})
    assert Settings.from_infotext(paper.to_infotext()) == paper
