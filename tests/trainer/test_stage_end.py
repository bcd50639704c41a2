"""A stage ends with its checkpoint, then its evaluations: a failing or killed evaluation never costs the stage."""

from __future__ import annotations

import json

import pytest

from moba_train.job.checkpoint_files import read_state
from tests.trainer.cli_run import losses, records, run_cli, same_export, same_numbers, same_rows

TINY = ["recipe=tiny", "logger=none"]


def checkpoint_steps(out) -> list[int]:
    return sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*") if p.is_dir())


@pytest.mark.timeout(600)
def test_a_failing_evaluation_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    res = run_cli(out, [*TINY, "debug.fail_evaluations=[passkey]", "trainer.keep_checkpoints=10"])
    errors = records(out, "eval_error")
    assert [(e["stage"], e["evaluation"]) for e in errors] == [("short", "passkey"), ("long", "passkey"),
                                                               ("sft", "passkey")]
    assert all("injected failure" in e["error"] and "eval.passkey.enabled=false" in e["fix"] for e in errors)
    assert "evaluation passkey FAILED" in res.stdout and "fix:" in res.stdout
    assert len(records(out, "eval")) == 3                       # the other evaluations still ran
    assert [r["eval_errors"] != [] for r in records(out, "stage_end")] == [True, True, True]
    assert checkpoint_steps(out) == [2, 4, 5]                   # every stage's checkpoint, though checkpoint_every=0
    assert (out / "hf_model" / "config.json").is_file()
    assert read_state(out / "checkpoints" / "step00000005").eval_pending is None


@pytest.mark.timeout(600)
def test_on_error_fail_stops_after_the_checkpoint_and_the_next_run_repeats_only_the_evaluation(tmp_path):
    out = tmp_path / "run"
    res = run_cli(out, [*TINY, "debug.fail_evaluations=[position_loss]", "eval.on_error=fail"], check=False)
    assert res.returncode != 0 and "the stage-end evaluation failed" in res.stderr
    assert checkpoint_steps(out) == [2]
    assert read_state(out / "checkpoints" / "step00000002").eval_pending == 0
    run_cli(out, TINY)                                          # fixed: the evaluation runs, then stage 1 trains
    assert [r["stage"] for r in records(out, "eval")] == ["short", "long", "sft"]
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]   # stage 0 was not trained again


@pytest.mark.timeout(900)
def test_a_kill_during_the_evaluation_resumes_into_the_evaluation_with_nothing_lost(tmp_path):
    whole = tmp_path / "whole"
    run_cli(whole, TINY)
    broken = tmp_path / "broken"
    res = run_cli(broken, [*TINY, "debug.fail_evaluations=[passkey:kill]"], check=False)
    assert res.returncode == 17
    assert checkpoint_steps(broken) == [2]                      # the stage's checkpoint was written first
    run_cli(broken, TINY)
    assert same_numbers(losses(broken), losses(whole), "losses")
    for kind in ("eval", "passkey", "stage_end"):               # each stage evaluated once, as uninterrupted
        got = [(r["stage_index"], r.get("mean_loss"), r.get("accuracy")) for r in records(broken, kind)]
        want = [(r["stage_index"], r.get("mean_loss"), r.get("accuracy")) for r in records(whole, kind)]
        assert same_rows(got, want, rounded=(1,), what=kind), (kind, got, want)
    assert same_export(broken / "hf_model", whole / "hf_model")


@pytest.mark.timeout(600)
def test_the_stage_start_record_says_which_backend_each_layer_kind_runs(tmp_path):
    out = tmp_path / "run"
    run_cli(out, [*TINY, "trainer.export=false", "eval.passkey.enabled=false"])
    starts = records(out, "stage_start")
    assert [s["backends"] for s in starts] == [{"moba": "lean"}, {"moba": "lean", "full": "sdpa"},
                                               {"moba": "lean", "full": "sdpa"}]
    assert starts[1]["resolved"]["attention"]["block_size"] == 64 and starts[1]["resolved"]["rope"]["theta"] == 40000
    assert [s["backends"] for s in records(out, "stage_end")] == [s["backends"] for s in starts]
    assert json.loads(json.dumps(starts[2]["resolved"]))["rope"]["theta"] == 40000   # inherited by the SFT stage
