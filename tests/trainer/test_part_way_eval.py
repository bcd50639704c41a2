"""Part-way evaluations (stages[].eval_at): the untrained baseline and points inside a stage, each after a
checkpoint of the steps before it, on every configured passkey haystack; a kill during one loses nothing."""

from __future__ import annotations

import pytest

from moba_train.job.checkpoint_files import read_state
from tests.trainer.cli_run import losses, records, run_cli, same_export, same_numbers, same_rows

TINY = ["recipe=tiny", "logger=none", "stages.0.steps=4", "trainer.keep_checkpoints=10"]


def checkpoint_steps(out) -> list[int]:
    return sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*") if p.is_dir())


def evaluations(out, kind: str) -> list[tuple]:
    return [(r["stage_index"], r.get("part_way"), r["step"], r.get("stage_step"), r.get("tokens_seen"),
             r.get("haystack"), r.get("mean_loss"), r.get("accuracy")) for r in records(out, kind)]


@pytest.mark.timeout(600)
def test_a_stage_is_evaluated_before_its_first_step_and_part_way_on_each_haystack(tmp_path):
    out = tmp_path / "run"
    run_cli(out, [*TINY, "stages.0.eval_at=[0,0.5]", "eval.passkey.haystack=[lee,python]", "trainer.export=false"])
    evals = records(out, "eval")
    assert [(r["stage_index"], r.get("part_way"), r["stage_step"]) for r in evals] == [
        (0, 0, 0), (0, 1, 2), (0, None, 0), (1, None, 0), (2, None, 0)]   # stage ends: stage_step counts the next
    train = records(out)
    assert evals[0]["tokens_seen"] == 0 and evals[0]["step"] == 0                    # the untrained model
    assert evals[1]["tokens_seen"] == sum(r["tokens"] for r in train[:2]) and evals[1]["step"] == 2
    passkey = records(out, "passkey")
    assert [(r["stage_index"], r.get("part_way"), r["haystack"]) for r in passkey] == [
        (0, 0, "lee"), (0, 0, "python"), (0, 1, "lee"), (0, 1, "python"), (0, None, "lee"), (0, None, "python"),
        (1, None, "lee"), (1, None, "python"), (2, None, "lee"), (2, None, "python")]
    # each record says what its evaluation cost; a passkey evaluation's haystacks share one time
    assert all(isinstance(r["seconds"], float) and r["seconds"] > 0 for r in evals + passkey)
    assert all(a["seconds"] == b["seconds"] for a, b in zip(passkey[::2], passkey[1::2]))
    # the steps before the part-way evaluation were checkpointed first (checkpoint_every is 0), and that
    # checkpoint records the evaluation as done once it completed
    assert checkpoint_steps(out) == [2, 4, 6, 7]
    assert read_state(out / "checkpoints" / "step00000002").part_way_evals_done == 2
    assert {"passkey_by_tokens.png", "passkey_heatmap.png"} <= {p.name for p in (out / "plots").iterdir()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("eval_at", ["0.5", "0"], ids=["kill-part-way", "kill-before-the-first-step"])
def test_a_kill_during_a_part_way_evaluation_repeats_only_it(tmp_path, eval_at):
    """Killed inside the evaluation after step 2, the run resumes from the checkpoint written just before it,
    repeats the evaluation, and ends as the uninterrupted run; killed while evaluating the untrained model
    (no checkpoint yet), it starts over without keeping the records of the killed try."""
    overrides = [*TINY, f"stages.0.eval_at=[{eval_at}]"]
    whole = tmp_path / "whole"
    run_cli(whole, overrides)
    broken = tmp_path / "broken"
    res = run_cli(broken, [*overrides, "debug.fail_evaluations=[passkey:kill]"], check=False)
    assert res.returncode == 17
    assert checkpoint_steps(broken) == ([2] if eval_at == "0.5" else [])
    run_cli(broken, overrides)
    assert same_numbers(losses(broken), losses(whole), "losses")
    for kind in ("eval", "passkey", "stage_end"):
        got, want = evaluations(broken, kind), evaluations(whole, kind)
        assert same_rows(got, want, rounded=(6,), what=kind), (kind, got, want)     # 6: the mean loss
    assert len(records(broken, "stage_start")) == len(records(whole, "stage_start")) + (eval_at == "0.5")
    assert same_export(broken / "hf_model", whole / "hf_model")
