"""AttentionPlan: config forms, schedule over progress, logging, descriptions, validation messages."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from moba_train.models import AttentionPlan, AttentionPlanConfig, LayerAttention

BASE = {"block_size": 512, "topk": 3}
SCHEDULE = {**BASE, "phases": [{"until": 0.9, "moba_layers": "all"}, {"until": 1.0, "moba_layers": "none"}]}


def moba_layers(plan: AttentionPlan, progress=None) -> list[int]:
    return [i for i in range(plan.num_layers) if plan.at(i, progress=progress).mode == "moba"]


@pytest.mark.parametrize("spec, expected", [
    ("all", list(range(8))),
    ("none", []),
    ({"all_but_last": 3}, [0, 1, 2, 3, 4]),
    ({"all_but_last": 0}, list(range(8))),
    ([0, 2, -1], [0, 2, 7]),
    ([], []),
], ids=["all", "none", "all-but-last-3", "all-but-last-0", "list-with-negative", "empty-list"])
def test_moba_layers_forms(spec, expected):
    plan = AttentionPlan.from_config({**BASE, "moba_layers": spec}, 8)
    assert moba_layers(plan) == expected


def test_layer_attention_carries_settings_and_backends():
    plan = AttentionPlan.from_config({"block_size": 64, "topk": 2, "backend": "naive", "full_backend": "sdpa",
                                      "moba_layers": [1]}, 3)
    assert plan.at(1) == LayerAttention("moba", 64, 2, "naive")
    assert plan.at(0) == LayerAttention("full", 64, 2, "sdpa")
    with pytest.raises(AttributeError):
        plan.at(0).mode = "moba"   # frozen


@pytest.mark.parametrize("progress, moba", [(0.0, True), (0.5, True), (0.8999, True), (0.9, False), (1.0, False)])
def test_schedule_at_progress(progress, moba):
    plan = AttentionPlan.from_config(SCHEDULE, 4)
    assert (moba_layers(plan, progress) == [0, 1, 2, 3]) is moba
    assert plan.progress == 0.0   # asking does not move the plan


def test_set_progress_switches_once_and_logs(caplog):
    plan = AttentionPlan.from_config(SCHEDULE, 4)
    changes = []
    with caplog.at_level(logging.INFO, logger="moba_train.models.plan"):
        for p in (0.0, 0.3, 0.89, 0.9, 0.95, 1.0):
            changes.append(plan.set_progress(p))
    assert changes == [False, False, False, True, False, False]
    assert [r.getMessage() for r in caplog.records] == ["attention plan at progress 0.9000: full layers 0-3"]
    assert plan.at(0).mode == "full" and plan.progress == 1.0


def test_three_phases_and_going_back():
    plan = AttentionPlan.from_config({**BASE, "phases": [
        {"until": 0.25, "moba_layers": "none"}, {"until": 0.75, "moba_layers": {"all_but_last": 1}},
        {"until": 1.0, "moba_layers": [0]}]}, 4)
    assert moba_layers(plan) == []
    assert plan.set_progress(0.5) and moba_layers(plan) == [0, 1, 2]
    assert plan.set_progress(0.8) and moba_layers(plan) == [0]
    assert plan.set_progress(0.1) and moba_layers(plan) == []   # a new stage may restart the schedule


@pytest.mark.parametrize("cfg, n, text", [
    ({**BASE, "moba_layers": {"all_but_last": 3}}, 32, "moba(b512,k3) layers 0-28; full 29-31"),
    ({**BASE, "moba_layers": "none"}, 4, "full layers 0-3"),
    ({"block_size": 64, "topk": 2, "moba_layers": [0, 1, 2, 5, 7]}, 8, "moba(b64,k2) layers 0-2,5,7; full 3-4,6"),
    ({**BASE, "moba_layers": [-1]}, 3, "full layers 0-1; moba(b512,k3) 2"),
], ids=["all-but-last", "none", "scattered", "last-only"])
def test_describe(cfg, n, text):
    assert AttentionPlan.from_config(cfg, n).describe() == text


def test_two_plans_are_independent():
    a = AttentionPlan.from_config(SCHEDULE, 4)
    b = AttentionPlan.from_config(SCHEDULE, 4)
    a.set_progress(0.95)
    assert a.at(0).mode == "full" and b.at(0).mode == "moba"


def test_to_config_round_trip_and_equality():
    plan = AttentionPlan.from_config({**BASE, "moba_layers": {"all_but_last": 1}}, 4)
    again = AttentionPlan.from_config(plan.to_config(), 4)
    assert again == plan and again.to_config()["phases"] == [{"until": 1.0, "moba_layers": {"all_but_last": 1}}]
    again.set_progress(0.5)
    assert again != plan   # progress is part of a plan's state


def test_omegaconf_config_and_structured_schema():
    schema = OmegaConf.structured(AttentionPlanConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.create(SCHEDULE))
    assert AttentionPlan.from_config(cfg, 4) == AttentionPlan.from_config(SCHEDULE, 4)
    with pytest.raises(Exception, match="moba_layer"):
        OmegaConf.merge(schema, {"moba_layer": "all"})


@pytest.mark.parametrize("cfg, n, message", [
    ({**BASE, "moba_layer": "all"}, 4, "unknown key 'moba_layer' in attention plan; did you mean 'moba_layers'"),
    ({**BASE}, 4, "give exactly one of `moba_layers`"),
    ({**BASE, "moba_layers": "all", "phases": SCHEDULE["phases"]}, 4, "give exactly one of `moba_layers`"),
    ({**BASE, "topk": 0, "moba_layers": "all"}, 4, r"topk must be an int >= 1, got 0"),
    ({**BASE, "block_size": 0, "moba_layers": "all"}, 4, r"block_size must be an int >= 1, got 0"),
    ({**BASE, "block_size": 12.5, "moba_layers": "all"}, 4, r"block_size must be an int >= 1, got 12.5"),
    ({**BASE, "moba_layers": [0, 4]}, 4, r"layer index 4 is out of range for a model with 4 layers \(valid: -4..3\)"),
    ({**BASE, "moba_layers": [-5]}, 4, r"layer index -5 is out of range"),
    ({**BASE, "moba_layers": [1, -3]}, 4, r"layer 1 is listed twice"),
    ({**BASE, "moba_layers": {"all_but_last": 5}}, 4, r"all_but_last=5 exceeds the model's 4 layers"),
    ({**BASE, "moba_layers": {"all_but": 1}}, 4, r"must be \{'all_but_last': N\}"),
    ({**BASE, "moba_layers": "most"}, 4, r"moba_layers must be 'all', 'none'"),
    ({**BASE, "phases": []}, 4, "phases must be a non-empty list"),
    ({**BASE, "phases": [{"until": 0.9, "moba_layers": "all"}]}, 4, "the last phase must have until: 1.0"),
    ({**BASE, "phases": [{"until": 0.5, "moba_layers": "all"}, {"until": 0.5, "moba_layers": "none"},
                         {"until": 1.0, "moba_layers": "all"}]}, 4, r"phases\[1\]: until=0.5 must be a number in \(0.5, 1.0\]"),
    ({**BASE, "phases": [{"until": 1.5, "moba_layers": "all"}]}, 4, r"until=1.5 must be a number in \(0.0, 1.0\]"),
    ({**BASE, "phases": [{"until": 1.0}]}, 4, r"phases\[0\] needs both 'until' and 'moba_layers'"),
    ({**BASE, "phases": [{"until": 1.0, "layers": "all"}]}, 4, r"unknown key 'layers' in attention plan phases\[0\]"),
    ({**BASE, "backend": "leen", "moba_layers": "all"}, 4, r"backend must be one of \['auto', .*'lean'.*\], got 'leen'"),
    ({**BASE, "full_backend": "flash2", "moba_layers": "all"}, 4,
     r"full_backend must be one of \['auto', 'fa4', 'flash', 'sdpa', 'varlen'\], got 'flash2'"),
    ({**BASE, "moba_layers": "all"}, 0, "num_layers must be an int >= 1"),
], ids=["typo-key", "neither", "both", "topk-0", "block-0", "block-float", "index-too-big", "index-too-negative",
        "duplicate", "all-but-too-many", "bad-mapping", "bad-word", "no-phases", "not-ending-at-1", "not-increasing",
        "until-above-1", "phase-missing-key", "phase-typo", "unknown-backend", "unknown-full-backend", "zero-layers"])
def test_bad_configs_raise_with_the_fix(cfg, n, message):
    with pytest.raises(ValueError, match=message):
        AttentionPlan.from_config(cfg, n)


@pytest.mark.parametrize("p", [-0.1, 1.01, "0.5", True])
def test_bad_progress(p):
    plan = AttentionPlan.from_config(SCHEDULE, 4)
    with pytest.raises(ValueError, match=r"progress must be a number in \[0, 1\]"):
        plan.set_progress(p)


def test_layer_index_out_of_range():
    with pytest.raises(IndexError, match="layer_idx 4 out of range for a plan of 4 layers"):
        AttentionPlan.from_config(SCHEDULE, 4).at(4)
