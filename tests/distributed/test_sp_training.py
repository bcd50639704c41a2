"""Training with sequence parallelism 2 gives the losses of sequence parallelism 1 (same packs, CPU, gloo)."""

import pytest

from tests.trainer.cli_run import losses, records, run_cli

TINY = ["recipe=tiny", "trainer.export=false"]


@pytest.mark.timeout(600)
def test_sp2_training_matches_sp1(tmp_path):
    ref = tmp_path / "sp1"
    run_cli(ref, TINY)
    sp2 = tmp_path / "sp2"
    run_cli(sp2, [*TINY, "parallel=ulysses2"], nproc=2)
    assert losses(sp2) == pytest.approx(losses(ref), abs=2e-5)
    assert [r["tokens"] for r in records(sp2)] == [r["tokens"] for r in records(ref)]


@pytest.mark.timeout(600)
def test_stage_changes_sequence_parallel_inside_one_run(tmp_path):
    """sp 1 at the short stage, 2 at the long one, on two processes (data parallel 2, then 1)."""
    out = tmp_path / "run"
    run_cli(out, [*TINY, "stages.1.sequence_parallel=2"], nproc=2)
    steps = records(out)
    assert [r["stage"] for r in steps] == ["short", "short", "long", "long", "sft"]
    # dp 2 in the short stage: 2 packs per step; dp 1 with sp 2 in the long stage: 1 pack per step
    assert [r["tokens"] for r in steps][:4] == [512, 512, 512, 512]
