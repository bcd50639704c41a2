"""Resuming into another data-parallel size (the kill-at-every-step matrix is in tests/faults/)."""

import pytest

from tests.trainer.cli_run import losses, records, run_cli, same_numbers

TINY = ["recipe=tiny", "trainer.checkpoint_every=1", "trainer.export=false"]


@pytest.mark.timeout(600)
def test_resume_into_a_different_data_parallel_size_uses_the_universal_checkpoint(tmp_path):
    """ZeRO-2 on 2 processes, killed after step 3, resumed on 1 process with the same global batch."""
    two = ["recipe=tiny", "deepspeed=zero2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10",
           "trainer.export=false"]
    whole = tmp_path / "whole"
    run_cli(whole, two, nproc=2)
    reference = losses(whole)

    broken = tmp_path / "broken"
    res = run_cli(broken, [*two, "debug.crash_after_step=3"], nproc=2, check=False)
    assert res.returncode != 0
    one = [*two, *(f"stages.{i}.grad_accum=2" for i in range(3))]   # 1 process x 2 micro-batches = 2 x 1
    run_cli(broken, one)
    assert (broken / "checkpoints" / "step00000003_universal").is_dir()
    got = losses(broken)
    assert len(got) == len(reference)
    assert same_numbers(got[:3], reference[:3], "losses")           # both 2-process runs
    assert got[3:] == pytest.approx(reference[3:], rel=1e-5)
