"""Checkpoints are verified, not trusted: a corrupt or truncated one is reported by path and skipped for the
newest valid one (or stops the run, by a setting); another model's checkpoint gets one line."""

from __future__ import annotations

import pytest

from tests.faults.resume_cases import TINY, assert_same_run
from tests.trainer.cli_run import records, run_cli

CKPT = "checkpoints/step{:08d}"


def _states(out, step):
    return out / CKPT.format(step) / "mp_rank_00_model_states.pt"


@pytest.fixture
def killed_after_step_3(tmp_path):
    out = tmp_path / "run"
    res = run_cli(out, [*TINY, "debug.crash_after_step=3"], check=False)
    assert res.returncode == 17
    return out


@pytest.mark.timeout(600)
def test_garbage_in_the_newest_checkpoint_is_reported_and_the_previous_one_resumes(killed_after_step_3,
                                                                                      uninterrupted):
    out = killed_after_step_3
    with open(_states(out, 3), "r+b") as f:           # 4 KiB of garbage inside the weights
        f.seek(_states(out, 3).stat().st_size // 2)
        f.write(b"\x7f" * 4096)
    res = run_cli(out, TINY)
    assert f"checkpoint {out / CKPT.format(3)} is corrupt or incomplete: mp_rank_00_model_states.pt does not match " \
           f"its checksum" in res.stdout
    assert "resumed from" in res.stdout and CKPT.format(2) in res.stdout
    assert_same_run(out, uninterrupted)                # nothing trained on NaNs; the lost step was trained again


@pytest.mark.timeout(600)
def test_a_truncated_checkpoint_stops_the_run_naming_it_when_asked_to(killed_after_step_3):
    out = killed_after_step_3
    with open(_states(out, 3), "r+b") as f:
        f.truncate(1000)
    res = run_cli(out, [*TINY, "trainer.on_corrupt_checkpoint=fail"], check=False)
    assert res.returncode == 1
    message = res.stderr.strip().splitlines()[-1]
    assert message.startswith(f"moba-train: checkpoint {out / CKPT.format(3)} is corrupt or incomplete: "
                              f"mp_rank_00_model_states.pt has 1,000 bytes")
    assert "trainer.on_corrupt_checkpoint=fallback" in message and "Traceback" not in res.stderr
    assert len(records(out)) == 3                        # nothing trained


@pytest.mark.timeout(600)
def test_a_checkpoint_of_another_model_shape_gets_one_line(tmp_path):
    out = tmp_path / "run"
    run_cli(out, [*TINY, "debug.crash_after_step=1"], check=False)
    res = run_cli(out, [*TINY, "model.config.hidden_size=128", "model.config.intermediate_size=256"], check=False)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "size mismatch" not in res.stderr.replace("(size mismatch", "")
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"moba-train: checkpoint {out / CKPT.format(1)} does not match the recipe's model")
    assert "trainer.resume=never" in last


@pytest.mark.timeout(600)
def test_a_resume_keeps_the_routing_convention_the_checkpoint_was_trained_with(tmp_path):
    """A checkpoint records each stage's centroids convention; resuming with another one is refused with the fix
    (a checkpoint from before the setting existed counts as fp32), resuming with the same one goes on."""
    import json

    out = tmp_path / "run"
    run_cli(out, [*TINY, "attention.centroids=fp32", "debug.crash_after_step=3"], check=False)
    res = run_cli(out, TINY, check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "trained stages[0] (short) with attention centroids='fp32'" in last
    assert "set attention.centroids=fp32" in last
    state_file = out / CKPT.format(3) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["centroids"] == {"short": "fp32", "long": "fp32"}
    del state["centroids"]                                    # as written before the convention was recorded
    state_file.write_text(json.dumps(state))
    res = run_cli(out, TINY, check=False)
    assert res.returncode == 1 and "written before the setting existed used 'fp32'" in res.stderr
    run_cli(out, [*TINY, "attention.centroids=fp32"])
    assert len(records(out)) == 5
