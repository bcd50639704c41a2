"""NaN/inf losses skip the step (and abort after too many in a row); Ctrl-C saves a checkpoint first;
out-of-memory errors name the knobs that reduce memory."""

import pytest
import torch

from moba_train.config import load_run_config
from moba_train.trainer.failures import explain_oom, is_oom
from tests.trainer.cli_run import losses, records, run_cli, same_numbers
from tests.trainer.compose import compose_config

TINY = ["recipe=tiny", "trainer.export=false", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10"]


def _module_weights(ckpt_dir):
    files = sorted(ckpt_dir.glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero,nproc", [(0, 1), (2, 2)], ids=["zero0-1proc", "zero2-2procs"])
def test_nan_loss_on_one_rank_skips_the_step_everywhere(tmp_path, zero, nproc):
    out = tmp_path / "run"
    run_cli(out, [*TINY, f"deepspeed=zero{zero}", "debug.poison_loss_at_steps=[2]"], nproc=nproc)
    steps = records(out)
    assert [r["skipped"] for r in steps] == [False, True, False, False, False]
    assert steps[1]["loss"] is None and all(r["loss"] is not None for r in steps if not r["skipped"])
    before, after = (_module_weights(out / "checkpoints" / f"step0000000{i}") for i in (1, 2))
    assert all(torch.equal(before[k], after[k]) for k in before)       # the skipped step changed nothing
    third = _module_weights(out / "checkpoints" / "step00000003")
    assert any(not torch.equal(after[k], third[k]) for k in after)     # training goes on afterwards


@pytest.mark.timeout(300)
def test_too_many_bad_steps_in_a_row_abort_with_a_clear_message(tmp_path):
    res = run_cli(tmp_path / "run", [*TINY, "debug.poison_loss_at_steps=[1,2]", "trainer.max_bad_steps=2"], check=False)
    assert res.returncode != 0
    assert "2 steps in a row had a NaN/inf loss" in res.stderr and "lower stages[0].lr.peak" in res.stderr


@pytest.mark.timeout(300)
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path):
    out = tmp_path / "run"
    plain = ["recipe=tiny", "trainer.export=false"]                   # no periodic checkpoints
    res = run_cli(out, [*plain, "debug.interrupt_after_step=3"], check=False)
    assert res.returncode == 0 and "stopped by signal after global step 3" in res.stdout
    assert records(out, "run_end")[-1]["status"] == "stopped"
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"
    run_cli(out, plain)
    whole = tmp_path / "whole"
    run_cli(whole, plain)
    assert same_numbers(losses(out), losses(whole), "losses")


def test_out_of_memory_message_lists_the_memory_knobs():
    cfg = load_run_config(compose_config(["recipe=tiny"]))
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(ValueError("shapes do not match"))
    text = explain_oom(cfg, cfg.stages[1])
    for knob in ("micro_batch_size", "activation_checkpointing", "zero3", "sequence_parallel", "loss_chunk_tokens",
                 "tiled_mlp_chunks"):
        assert knob in text
    assert "stage 'long' at seq_len 512" in text
