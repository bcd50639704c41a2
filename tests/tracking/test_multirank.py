"""Two processes (ZeRO-3, Ulysses over both) record what one process records: the summed FLOPs and routing
statistics match, and passkey generation runs on partitioned weights."""

import os
import subprocess
import sys

import pytest

from tests.tracking.moba_cli import BASE_ENV, moba_train, records

RUN = ["recipe=tiny", "deepspeed=zero3", "debug.max_steps_per_stage=1", "eval.passkey.depths=[0.5]",
       "trainer.export=false", "eval.plots=false", "trainer.dist_timeout_s=120"]


@pytest.mark.timeout(600)
def test_two_ranks_with_sequence_parallelism_record_what_one_rank_does(tmp_path):
    one = tmp_path / "one"
    moba_train([*RUN, f"paths.output_dir={one}"], tmp_path)
    two = tmp_path / "two"
    env = {**BASE_ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moba_train",
           *RUN, "parallel=ulysses2", f"paths.output_dir={two}"]
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-6000:]

    for a, b in zip(records(one / "metrics.jsonl"), records(two / "metrics.jsonl"), strict=True):
        assert b["flops"] == a["flops"] and b["attention_flops"] == a["attention_flops"]
        assert b["tokens_per_s_per_gpu"] == pytest.approx(b["tokens_per_s"] / 2)
    routing_one, routing_two = (records(d / "metrics.jsonl", "routing") for d in (one, two))
    assert len(routing_one) == len(routing_two) == 3
    for a, b in zip(routing_one, routing_two):
        assert b["distance_counts"] == a["distance_counts"]
        assert b["sampled_queries"] == 2 * a["sampled_queries"]              # the same queries, half the heads each
        assert b["mass_captured"] == pytest.approx(a["mass_captured"], rel=1e-5)
    assert [r["lengths"] for r in records(two / "metrics.jsonl", "passkey")] == [[256], [512], [256]]
