"""Tiny random models of each supported family, and packed inputs for them."""

from __future__ import annotations

import copy

import torch

from moba_train.models import AttentionPlan, attach_plan, build_from_config

VOCAB = 256
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "mistral": dict(model_type="mistral"),   # keeps its default sliding_window=4096: longer than any test document
}


def tiny_config(family: str, **overrides) -> dict:
    return {**COMMON, **FAMILIES[family], **overrides}


def stock_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model with transformers' own SDPA attention, in eval mode."""
    return build_from_config(tiny_config(family, **overrides), seed=seed).eval()


def with_plan(model: torch.nn.Module, plan_cfg: dict) -> torch.nn.Module:
    """A copy of `model` running moba-train's attention under a plan built from `plan_cfg`."""
    ours = copy.deepcopy(model)
    attach_plan(ours, AttentionPlan.from_config(plan_cfg, ours.config.num_hidden_layers))
    return ours


def pack(docs: list[torch.Tensor]) -> dict:
    """One row holding `docs` back to back: input_ids, restarting position_ids and transformers' varlen kwargs."""
    lens = [len(d) for d in docs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=torch.cat(docs)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))


def random_docs(lens, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]


@torch.no_grad()
def logits(model, **inputs) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits.float()
