"""ZeRO 1, 2 and 3 on two CPU processes train the same as one process on the same global batches."""

import pytest

from tests.trainer.cli_run import losses, run_cli

TINY = ["recipe=tiny", "trainer.export=false"]
ONE_PROCESS_SAME_BATCH = [f"stages.{i}.grad_accum=2" for i in range(3)]   # 2 micro-batches = 2 ranks x 1


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    run_cli(out, [*TINY, "deepspeed=zero0", *ONE_PROCESS_SAME_BATCH])
    return losses(out)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero", [1, 2, 3], ids=lambda z: f"zero{z}")
def test_two_processes_match_one(tmp_path, zero, single_process_losses):
    out = tmp_path / "run"
    run_cli(out, [*TINY, f"deepspeed=zero{zero}"], nproc=2)
    got = losses(out)
    assert len(got) == len(single_process_losses) == 5
    assert got[0] == pytest.approx(single_process_losses[0], abs=1e-6)   # same weights, same tokens
    assert got == pytest.approx(single_process_losses, abs=2e-5)          # AdamW amplifies reduction order a little


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", ["zero2_offload", "zero3_offload"])
def test_cpu_offload_trains_like_no_offload(tmp_path, variant):
    """Optimizer (and for ZeRO-3 parameter) offload moves where the state lives, not the math."""
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    run_cli(plain, [*TINY, "deepspeed=zero0"])
    run_cli(offloaded, [*TINY, f"deepspeed={variant}"])
    assert losses(offloaded) == pytest.approx(losses(plain), abs=2e-5)
