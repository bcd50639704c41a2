"""The export tells the truth: the context trained and the last stage's RoPE, readable by plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moba_train.models import AttentionPlan, attach_plan, load
from tests.trainer.cli_run import run_cli

# Run with moba_train made unimportable: the export must not need it.
PLAIN = """
import sys, json, torch
sys.modules["moba_train"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sdpa").eval()
ids = torch.tensor([list(range(100, 140))])
with torch.no_grad():
    logits = model(input_ids=ids).logits[0, -1]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
print(json.dumps({"rope": model.config.rope_parameters, "max_pos": model.config.max_position_embeddings,
                  "logits": logits.tolist(), "generated": out[0, 40:].tolist()}))
"""


@pytest.mark.timeout(600)
def test_export_records_the_trained_context_and_rope_and_loads_in_plain_transformers(tmp_path):
    out = tmp_path / "run"
    run_cli(out, ["recipe=tiny", "logger=none", "eval.passkey.enabled=false"])
    exported = out / "hf_model"
    config = json.loads((exported / "config.json").read_text())
    assert config["max_position_embeddings"] == 512                   # tiny's longest stage, not the base 65536
    assert config["rope_parameters"]["rope_theta"] == 40000.0          # the last stage's (inherited from 'long')
    assert config["moba_train"]["trained_context"] == 512 and config["moba_train"]["progress"] == 1.0

    res = subprocess.run([sys.executable, "-c", PLAIN, str(exported)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plain = json.loads(res.stdout.strip().splitlines()[-1])
    assert plain["rope"]["rope_theta"] == 40000.0 and plain["max_pos"] == 512
    assert len(plain["generated"]) == 5
    # plain transformers runs dense attention: the same as moba-train's with every layer full
    ours = load(exported).model
    attach_plan(ours, AttentionPlan.from_config({"moba_layers": "none"}, ours.config.num_hidden_layers))
    with torch.no_grad():
        want = ours(input_ids=torch.tensor([list(range(100, 140))]), use_cache=False).logits[0, -1]
    torch.testing.assert_close(torch.tensor(plain["logits"]), want, atol=1e-4, rtol=1e-4)
