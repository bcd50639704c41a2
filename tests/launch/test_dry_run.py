"""The dry run of a cluster recipe on this machine: layout, divisibility rules, memory verdict."""

import dataclasses

import pytest

from moba_train.config import load_run_config
from moba_train.trainer.dry_run import DryRunRequest, dry_run
from moba_train.trainer.memory_estimate import Setup, Shape, estimate
from tests.tracking.moba_cli import moba_train
from tests.trainer.compose import compose_config

EIGHT_B = ["recipe=llama3_8b_128k_to_1m", "model.path=/nonexistent/Llama-3.1-8B"]


@pytest.fixture(scope="module")
def llama_8b():
    return load_run_config(compose_config(EIGHT_B))


@pytest.fixture(scope="module")
def report_4x8(llama_8b):
    return dry_run(llama_8b, DryRunRequest(nodes=4, gpus_per_node=8))


def test_8b_recipe_on_4_nodes_of_8(report_4x8, llama_8b):
    text = report_4x8.text
    assert "32 ranks" in text and "8.03B parameters" in text and "built-in shape llama3_8b" in text
    assert not report_4x8.failed_rules
    layout = {s.name: (s.sequence_parallel,) for s in llama_8b.stages}
    assert layout == {"ctx128k": (2,), "ctx256k": (4,), "ctx512k": (8,), "ctx1m": (8,), "sft": (2,)}
    for line, (sp, dp, steps) in {"| ctx128k": (2, 16, 239), "| ctx256k": (4, 8, 239), "| ctx512k": (8, 4, 477),
                                  "| ctx1m": (8, 4, 477), "| sft": (2, 16, 60)}.items():
        row = next(r for r in text.splitlines() if r.startswith(line) and "adjacent ranks" in r)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert (int(cells[2]), int(cells[3]), int(cells[8].replace(",", ""))) == (sp, dp, steps)
    assert sorted(report_4x8.estimates) == sorted(layout)
    # the verdict follows the estimates, whatever they are
    over = [n for n, e in report_4x8.estimates.items() if e.total > 80]
    assert report_4x8.stages_over == over and report_4x8.ok == (not over)
    assert ("DOES NOT FIT" in text) == bool(over)
    # every stage of the same per-GPU tokens costs the same; the 1M stage, with twice as many, costs more
    totals = {n: e.total for n, e in report_4x8.estimates.items()}
    assert totals["ctx128k"] == pytest.approx(totals["ctx256k"]) and totals["ctx1m"] > totals["ctx512k"]


@pytest.mark.parametrize("memory,fits", [(141.0, True), (40.0, False)], ids=["h200-fits", "40GiB-does-not"])
def test_verdict_against_the_gpu_memory(llama_8b, memory, fits):
    report = dry_run(llama_8b, DryRunRequest(4, 8, gpu_memory_gib=memory))
    assert report.ok is fits
    assert ("VERDICT: every rule holds" in report.text) is fits
    if not fits:
        assert "Knobs that reduce memory" in report.text


FAILING = {
    "ranks-not-divisible-by-sp": (dict(nodes=3, gpus_per_node=5), "sequence_parallel divides the ranks"),
    "heads-not-divisible-by-sp": (dict(nodes=4, gpus_per_node=8, model="qwen2_5_7b"),
                                  "sequence_parallel divides the query heads"),
}


@pytest.mark.parametrize("request_kw,rule", FAILING.values(), ids=FAILING.keys())
def test_broken_layouts_fail_with_the_rule_named(llama_8b, request_kw, rule):
    report = dry_run(llama_8b, DryRunRequest(**request_kw))
    assert not report.ok
    assert rule in {r.name for r in report.failed_rules}
    assert "FAIL" in report.text and "VERDICT: " in report.text


def test_memory_terms_follow_zero_sharding_and_offload():
    shape = Shape(params=1_000_000_000, layer_params=50_000_000, largest_module_params=200_000_000, layers=16,
                  hidden=2048, intermediate=8192, heads=16, kv_heads=4, head_dim=128, vocab=64000)
    base = Setup(world=8, sp=1, kv_copies=1, micro_batch=1, seq_len=4096, dtype_bytes=2, zero_stage=0,
                 offload_optimizer=False, offload_params=False, checkpointing=True, offload_activations=False,
                 tiled_mlp_chunks=1, loss_chunk_tokens=4096, moba_topk=3)
    gib = 2**30
    zero0 = estimate(shape, base)
    assert zero0.parts["weights"] == pytest.approx(2e9 / gib)
    assert zero0.parts["optimizer"] == pytest.approx(12e9 / gib)
    zero3 = estimate(shape, dataclasses.replace(base, zero_stage=3))
    assert zero3.parts["weights"] == pytest.approx((2e9 / 8 + 2 * 200_000_000) / gib)
    assert zero3.parts["optimizer"] == pytest.approx(12e9 / 8 / gib)
    offload = estimate(shape, dataclasses.replace(base, zero_stage=3, offload_optimizer=True, offload_params=True))
    assert offload.parts["optimizer"] == 0 and offload.host_gib_per_rank == pytest.approx((12e9 + 2e9) / 8 / gib)
    kept = estimate(shape, dataclasses.replace(base, offload_activations=True))
    assert zero0.parts["activations"] - kept.parts["activations"] == pytest.approx(16 * 4096 * 2048 * 2 / gib)
    assert estimate(shape, dataclasses.replace(base, checkpointing=False)).parts["activations"] > \
        zero0.parts["activations"]
    every2 = estimate(shape, dataclasses.replace(base, checkpoint_every=2)).parts["activations"]
    none = estimate(shape, dataclasses.replace(base, checkpointing=False)).parts["activations"]
    assert zero0.parts["activations"] < every2 < none
    # 8 of 16 layers keep only their input, the other 8 everything autograd saves: halfway, plus the shared term
    shared = zero0.parts["activations"] - 16 * 4096 * 2048 * 2 / gib
    assert every2 - shared == pytest.approx((none - shared + 16 * 4096 * 2048 * 2 / gib) / 2)


def test_selective_checkpointing_that_ran_out_of_memory_is_estimated_over_the_gpu():
    """Llama-3-8B at 32K with sp 2 and ZeRO-3 on two H200s (139.8 GiB each): every layer checkpointed peaked
    at 80.1 GiB; every 2nd layer ran out of memory (docs/benchmarks.md)."""
    shape = Shape(params=8_030_000_000, layer_params=218_000_000, largest_module_params=525_000_000, layers=32,
                  hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
    setup = Setup(world=2, sp=2, kv_copies=1, micro_batch=1, seq_len=32768, dtype_bytes=2, zero_stage=3,
                  offload_optimizer=False, offload_params=False, checkpointing=True, offload_activations=False,
                  tiled_mlp_chunks=1, loss_chunk_tokens=8192, moba_topk=None)
    assert 80.1 <= estimate(shape, setup).total <= 80.1 * 1.1
    assert estimate(shape, dataclasses.replace(setup, checkpoint_every=2)).total > 139.8


def test_cli_dry_run_exit_status_follows_the_verdict_and_writes_nothing(tmp_path):
    res = moba_train([*EIGHT_B, "dry_run=true", "nodes=4", "gpus_per_node=8"], tmp_path, check=False)
    assert "process groups per stage" in res.stdout
    assert res.returncode == (0 if "VERDICT: every rule holds" in res.stdout else 1)
    assert list(tmp_path.iterdir()) == []                      # no run directory, no .hydra
    wrong = moba_train([*EIGHT_B, "dry_run=true", "nodes=3", "gpus_per_node=5"], tmp_path, check=False)
    assert wrong.returncode == 1 and "rule(s) fail" in wrong.stdout


@pytest.mark.parametrize("args,message", [(["dry_run=true"], "needs nodes=N and gpus_per_node=G"),
                                          (["nodes=4"], "only apply to dry_run=true"),
                                          (["dry_run=true", "nodes=4", "gpus_per_node=8", "dry_run_model=gpt5"],
                                           "not a known architecture")],
                         ids=["no-cluster", "cluster-without-dry-run", "unknown-architecture"])
def test_invalid_dry_run_invocations(tmp_path, args, message):
    res = moba_train([*EIGHT_B, *args], tmp_path, check=False)
    assert res.returncode != 0 and message in res.stderr + res.stdout


def test_the_dry_run_lists_the_part_way_evaluations_the_trainer_will_run():
    cfg = load_run_config(compose_config(["recipe=smollm2_moba"]))
    stage = cfg.stages[0]
    for gpus, steps in ((1, (0, 37, 92, 184)), (4, (0, 9, 23, 46))):
        total = stage.total_steps(gpus)
        assert stage.part_way_eval_steps(total) == steps             # what the trainer's loop runs
        rows = [r for r in dry_run(cfg, DryRunRequest(nodes=1, gpus_per_node=gpus)).text.splitlines()
                if "part-way evaluations" in r]
        assert len(rows) == 2 and f"after steps {', '.join(map(str, steps))} of {total}" in rows[0]
        assert "after steps 0 of" in rows[1]
