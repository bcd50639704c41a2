"""Stages are resolved once: a stage states only what differs, and means exactly that."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from moba_train.config import load_run_config
from moba_train.schema import ConfigError
from tests.trainer.compose import RECIPES, compose_config, recipe_overrides

SNAPSHOT = Path(__file__).with_name("stages_snapshot.json")


def resolve(overrides: list[str]):
    return load_run_config(compose_config(overrides)).stages


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_resolves_to_the_stages_it_meant_when_it_restated_every_block(recipe):
    """The snapshot was taken from the recipes as they were, each stage restating its whole attention block and
    the trainer reading raw stage dicts; the recipes now state only what differs, and must mean the same."""
    got = json.loads(json.dumps([s.describe() for s in resolve(recipe_overrides(recipe))]))
    if os.environ.get("MOBA_TRAIN_UPDATE_SNAPSHOT") == recipe:   # only when a recipe's meaning is meant to change
        snapshot = json.loads(SNAPSHOT.read_text())
        SNAPSHOT.write_text(json.dumps({**snapshot, recipe: got}, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(SNAPSHOT.read_text())[recipe]


def test_a_partial_stage_attention_block_inherits_the_runs_settings():
    """The issue's example: `moba_layers` alone keeps tiny's block 64 and top-2 (it used to train moba(b512,k3))."""
    stages = resolve(["recipe=tiny", "+stages.0.attention={moba_layers: all}"])
    spec = stages[0].attention
    assert (spec.block_size, spec.topk, spec.backend) == (64, 2, "auto")
    assert [p.moba_layers for p in spec.phases] == ["all"]


def test_a_stage_schedule_replaces_the_runs_schedule_as_a_unit():
    """tiny's run says moba_layers: all; its 'long' stage gives phases and keeps the run's block size."""
    long = resolve(["recipe=tiny"])[1]
    assert long.attention.block_size == 64 and long.attention.topk == 3
    assert [(p.until, p.moba_layers) for p in long.attention.phases] == [(0.5, "all"), (1.0, "none")]
    with pytest.raises(ConfigError, match="exactly one of `moba_layers`"):      # both halves in one stage: refused
        resolve(["recipe=tiny", "+stages.1.attention.moba_layers=none"])


def test_a_merged_stage_block_is_checked_against_the_stage_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        resolve(["recipe=tiny", "+stages.0.attention={moba_layers: all}", "stages.0.seq_len=300"])
    assert "stages[0] (short): seq_len 300 must be divisible by the MoBA block_size 64" in str(err.value)
    assert "e.g. 256 or 320" in str(err.value)
    with pytest.raises(ConfigError, match=r"stages\[2\] \(sft\) attention: topk must be an int >= 1, got 0.*merged "
                                          r"over the run-level"):
        resolve(["recipe=tiny", "+stages.2.attention.topk=0"])


def test_rope_carries_on_from_the_stage_before():
    """tiny's SFT stage states no RoPE: it trains with the 40000 its 'long' stage set, on a resume too."""
    short, long, sft = resolve(["recipe=tiny"])
    assert short.rope.theta is None and not short.rope.changes_model      # the model's own
    assert long.rope.theta == 40000.0 and sft.rope.theta == 40000.0


def test_a_stage_that_continues_the_lr_schedule_has_no_warmup():
    stages = resolve(["recipe=tiny", "stages.1.lr.warmup=3", "stages.1.carry_over.lr_schedule=true"])
    assert stages[1].lr.warmup == 0.0 and stages[0].lr.warmup == 1.0


def test_stage_sequence_parallel_falls_back_to_the_runs():
    stages = resolve(["recipe=tiny", "parallel=ulysses2", "stages.2.sequence_parallel=1"])
    assert [s.sequence_parallel for s in stages] == [2, 2, 1]


def test_resolved_stages_are_frozen():
    stage = resolve(["recipe=tiny"])[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.seq_len = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.attention.block_size = 1


def test_data_position_carried_over_needs_the_same_data():
    with pytest.raises(ConfigError, match=r"stages\[1\] \(long\): carry_over.data_position .* must equal"):
        resolve(["recipe=tiny", "stages.1.carry_over.data_position=true", "stages.1.data.mix.stdlib=2.0"])
    stages = resolve(["recipe=tiny", "stages.1.carry_over.data_position=true"])
    assert stages[1].data_seed == stages[0].data_seed


def test_smoke_shrinks_the_merged_blocks():
    stages = resolve(["recipe=llama3_8b_128k_to_1m", "model.path=/nonexistent", "debug=smoke"])
    assert {s.seq_len for s in stages} == {256}
    assert {s.attention.block_size for s in stages} == {64}
    assert {s.sequence_parallel for s in stages} == {1}


@pytest.mark.parametrize("override, message", [
    ("stages.0.eval_at=[0.5,1.0]", r"stages\[0\] \(short\): eval_at must be distinct fractions .* in \[0, 1\)"),
    ("stages.0.eval_at=[0.5,0.5]", r"eval_at must be distinct fractions"),
    ("stages.2.eval_at=[0.5]", None),
], ids=["the-end-is-always-evaluated", "repeated", "fine"])
def test_part_way_evaluations_are_fractions_before_the_end(override, message):
    if message is None:
        assert resolve(["recipe=tiny", override])[2].part_way_eval_steps(4) == (2,)
        return
    with pytest.raises(ConfigError, match=message):
        resolve(["recipe=tiny", override])


def test_part_way_evaluations_need_the_stage_evaluated():
    with pytest.raises(ConfigError, match=r"stages\[0\] \(short\): eval_at asks for part-way evaluations of a stage "
                                          r"with eval: false; set eval: true or remove eval_at"):
        resolve(["recipe=tiny", "stages.0.eval_at=[0]", "stages.0.eval=false"])


def test_part_way_steps_round_to_steps_and_never_repeat_the_end():
    stage = resolve(["recipe=tiny", "stages.0.eval_at=[0,0.1,0.25,0.5]"])[0]
    assert stage.part_way_eval_steps(100) == (0, 10, 25, 50)
    assert stage.part_way_eval_steps(1) == (0,)        # a one-step stage (a smoke run): only the baseline


@pytest.mark.parametrize("value, ok", [("lee", True), ("[lee,python]", True), ("[python,python]", False),
                                       ("[lee,poems]", False), ("[]", False)])
def test_passkey_haystack_is_a_style_or_a_list_of_styles(value, ok):
    overrides = ["recipe=tiny", f"eval.passkey.haystack={value}"]
    if ok:
        load_run_config(compose_config(overrides))
        return
    with pytest.raises(ConfigError, match=r"eval.passkey.haystack must be one of \['lee', 'python'\] or a list"):
        load_run_config(compose_config(overrides))


ATTENTION_GROUPS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "attention").glob("*.yaml"))


@pytest.mark.parametrize("group", ATTENTION_GROUPS)
def test_every_attention_group_composes_with_the_quality_recipe_and_keeps_its_settings(group):
    """Each group states the block size and top-k it means (moba_fine_gate: 128 / 12), or inherits the defaults."""
    stages = resolve(["recipe=smollm2_moba", f"attention={group}"])
    meant = {"moba_fine_gate": (128, 12)}.get(group, (512, 3))
    assert all((s.attention.block_size, s.attention.topk) == meant for s in stages)
