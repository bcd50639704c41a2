"""A killed, stopped or re-run job ends exactly where the uninterrupted one does.

Kill -9 after every step of `tiny` (its SFT stage and the last step of its MoBA -> full stage included),
a Ctrl-C on that last step, and running a finished job again: each time the losses, grad norms,
evaluations, stage summaries and the exported bytes equal the uninterrupted run's. CI runs the steps
marked quick; `pytest -m exhaustive tests/faults` runs every step.
"""

from __future__ import annotations

import pytest

from tests.faults.resume_cases import STEPS, TINY, assert_same_run
from tests.trainer.cli_run import losses, records, run_cli

QUICK = {3: "mid-stage-long", 5: "in-the-sft-stage"}


def kill_steps():
    for step in range(1, STEPS + 1):
        marks = () if step in QUICK else (pytest.mark.exhaustive,)
        yield pytest.param(step, marks=marks, id=QUICK.get(step, f"after-step-{step}"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("step", list(kill_steps()))
def test_kill_after_any_step_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, step):
    out = tmp_path / "run"
    res = run_cli(out, [*TINY, f"debug.crash_after_step={step}"], check=False)
    assert res.returncode == 17, res.stderr[-2000:]
    assert len(losses(out)) == step
    run_cli(out, TINY)
    assert_same_run(out, uninterrupted)


@pytest.mark.timeout(600)
def test_ctrl_c_on_the_last_step_of_a_switching_stage_resumes_into_its_full_attention_evaluation(
        tmp_path, uninterrupted):
    """Step 4 ends stage 'long', whose plan is full attention from its half on: the stop saves at the stage's
    last step, and the resumed run evaluates the stage with full attention, as the uninterrupted one did."""
    out = tmp_path / "run"
    res = run_cli(out, [*TINY, "debug.interrupt_after_step=4"])
    assert "stopped by signal after global step 4" in res.stdout
    assert records(out, "run_end")[-1]["status"] == "stopped"
    run_cli(out, TINY)
    assert_same_run(out, uninterrupted)
    assert [r["plan"] for r in records(out, "stage_end")][1] == "moba(b64,k3) layers 0-3 then full layers 0-3"


@pytest.mark.timeout(600)
def test_running_a_finished_job_again_does_nothing_and_keeps_the_export(tmp_path):
    out = tmp_path / "run"
    run_cli(out, TINY)
    export = out / "hf_model" / "model.safetensors"
    before = (export.read_bytes(), export.stat().st_mtime_ns, (out / "metrics.jsonl").read_text())
    res = run_cli(out, TINY)
    assert "already finished at global step 5" in res.stdout
    assert (export.read_bytes(), export.stat().st_mtime_ns, (out / "metrics.jsonl").read_text()) == before
