"""`moba-train mode=eval checkpoint=...` on a tiny run's Hugging Face export and on its last checkpoint."""

import pytest

from tests.tracking.moba_cli import moba_train, records

FAST = ["recipe=tiny", "eval.passkey.depths=[0.5]", "eval.passkey.lengths=[256]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalmode")
    moba_train([*FAST, "debug.max_steps_per_stage=1", "eval.plots=false", f"paths.output_dir={tmp / 'run'}"], tmp)
    return tmp


def evaluate(tmp, checkpoint, name):
    out = tmp / name
    res = moba_train([*FAST, "mode=eval", f"checkpoint={checkpoint}", f"paths.output_dir={out}"], tmp)
    return res, out / "eval"


def test_export_and_checkpoint_evaluate_alike(trained):
    run = trained / "run"
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    res_hf, hf = evaluate(trained, run / "hf_model", "from_hf")
    res_ckpt, ckpt = evaluate(trained, latest, "from_ckpt")
    assert "Hugging Face directory" in res_hf.stdout and "training checkpoint" in res_ckpt.stdout
    for out in (hf, ckpt):
        evals = records(out / "metrics.jsonl", "eval")
        assert [r["stage"] for r in evals] == ["short", "long", "sft"]
        assert [len(r["bucket_loss"]) for r in evals] == [16, 16, 16]
        passkey = records(out / "metrics.jsonl", "passkey")
        assert len(passkey) == 1 and passkey[0]["lengths"] == [256] and len(passkey[0]["accuracy_grid"]) == 1
        assert sorted(p.name for p in (out / "plots").iterdir()) == ["loss_by_position.png", "passkey_heatmap.png"]
    # same weights, RoPE and attention plan: the same losses, bucket by bucket
    for a, b in zip(records(hf / "metrics.jsonl", "eval"), records(ckpt / "metrics.jsonl", "eval")):
        assert [x is None for x in a["bucket_loss"]] == [x is None for x in b["bucket_loss"]]
        assert [x for x in a["bucket_loss"] if x is not None] == pytest.approx(
            [x for x in b["bucket_loss"] if x is not None], rel=1e-5)
        assert a["tail_loss"] == pytest.approx(b["tail_loss"], rel=1e-5)
    assert not (trained / "from_hf" / ".hydra").exists()


def test_the_untrained_base_model_is_evaluated_with_the_recipes_attention_on_every_haystack(trained):
    """checkpoint=base: the zero-step baseline of an attention arm (quality studies compare against it)."""
    res, out = evaluate(trained, "base", "from_base")
    assert "the recipe's model before training" in res.stdout
    source = records(out / "metrics.jsonl", "eval_source")[0]
    assert source["plan"].startswith("moba(") and "full" in source["plan"]       # tiny's last stage: the SFT plan
    moba_train([*FAST, "mode=eval", "checkpoint=base", "eval.passkey.haystack=[lee,python]", "attention=full",
                "+stages.2.attention={moba_layers: none}", f"paths.output_dir={trained / 'from_base_full'}"], trained)
    out = trained / "from_base_full" / "eval"
    assert [r["haystack"] for r in records(out / "metrics.jsonl", "passkey")] == ["lee", "python"]
    assert records(out / "metrics.jsonl", "eval_source")[0]["plan"] == "full layers 0-3"
    trained_loss = records(trained / "from_hf" / "eval" / "metrics.jsonl", "eval")[0]["mean_loss"]
    assert records(out / "metrics.jsonl", "eval")[0]["mean_loss"] > trained_loss


def test_bad_checkpoint_path_is_refused_with_the_fix(tmp_path):
    res = moba_train([*FAST, "mode=eval", f"checkpoint={tmp_path}"], tmp_path, check=False)
    assert res.returncode != 0
    assert "neither a Hugging Face model directory" in res.stderr + res.stdout


@pytest.mark.parametrize("args,message", [(["mode=eval"], "mode=eval needs checkpoint="),
                                          (["checkpoint=/x"], "only used with mode=eval"),
                                          (["mode=sample"], "not one of train, eval")],
                         ids=["eval-without-checkpoint", "checkpoint-without-eval", "unknown-mode"])
def test_invalid_invocations(tmp_path, args, message):
    res = moba_train(["recipe=tiny", *args], tmp_path, check=False)
    assert res.returncode != 0 and message in res.stderr


class _Stop(Exception):
    pass


def test_the_model_is_evaluated_on_the_process_compute_device(tmp_path, monkeypatch):
    """The weights load on the CPU; on a GPU machine the evaluation must not stay there (it ran bf16 on the CPU).
    Here the compute device is the meta device, so the move is visible without a GPU."""
    import torch

    from moba_train.config.run import load_run_config
    from moba_train.eval import evaluate
    from tests.trainer.compose import compose_config

    seen = {}

    def first_evaluation(module, *args, **kwargs):
        seen["device"] = next(module.parameters()).device
        raise _Stop

    monkeypatch.setattr(evaluate, "compute_device", lambda: torch.device("meta"))
    monkeypatch.setattr(evaluate, "evaluate_position_loss", first_evaluation)
    cfg = load_run_config(compose_config([*FAST, f"paths.output_dir={tmp_path}"]))
    with pytest.raises(_Stop):
        evaluate.evaluate_checkpoint(cfg, evaluate.Path(evaluate.BASE))
    assert seen["device"] == torch.device("meta")
    assert records(tmp_path / "eval" / "metrics.jsonl", "eval_source")[0]["device"] == "meta"


@pytest.mark.gpu
def test_mode_eval_runs_on_the_gpu(tmp_path):
    res = moba_train([*FAST, "mode=eval", "checkpoint=base", f"paths.output_dir={tmp_path / 'base'}"], tmp_path)
    assert " on cuda:0;" in res.stdout
    assert records(tmp_path / "base" / "eval" / "metrics.jsonl", "eval_source")[0]["device"] == "cuda:0"
