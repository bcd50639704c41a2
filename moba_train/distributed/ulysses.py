"""Ulysses sequence parallelism for MoBA and full attention.

Each rank of a sequence-parallel group holds L/sp positions of every pack. Around attention an
all-to-all trades the sequence shard for a head shard: every rank then sees the *whole* sequence
for Hq/sp query heads (and their KV heads), which is all MoBA needs to stay exact, since it gates
each head over the full sequence with the pack's document boundaries. A second all-to-all brings
the output back to sequence shards.

The all-to-alls are DeepSpeed's (`DistributedAttention`, which also carries their backward).
Two pieces are our own: replicating KV heads when sp does not divide them (DeepSpeed's uneven-head
path would split a GQA group across ranks and needs a registered mpu), and the varlen call with
the pack's global `cu_seqlens`, which DeepSpeed's local-attention contract does not know about.
"""

from __future__ import annotations

import math

import torch
from deepspeed.sequence.layer import DistributedAttention

from moba_train.models.attention import attend_varlen, attention_modules
from moba_train.models.context import attention_context

from .groups import sequence_parallel_group

SHARDED_KEYS = ("input_ids", "position_ids", "shift_labels")


def kv_replication(sp: int, num_heads: int, num_kv_heads: int) -> int:
    """Copies of each KV head so that they split evenly over sp ranks (1 when sp divides Hkv)."""
    if num_heads % sp:
        raise ValueError(f"sequence_parallel={sp} must divide the {num_heads} query heads; "
                         f"use one of {[d for d in range(1, num_heads + 1) if num_heads % d == 0]}")
    # lcm(Hkv, sp) heads split evenly, and since sp divides Hq = G * Hkv, each rank's Hq/sp query heads
    # then cover whole groups of its KV heads (Hq/sp is a multiple of lcm(Hkv, sp)/sp).
    return math.lcm(num_kv_heads, sp) // num_kv_heads


class UlyssesAttention:
    """Wraps attend_varlen for one attention module: [B, L/sp, H, D] shards in, [B, L/sp, Hq, D] out."""

    def __init__(self, group, sp: int, num_heads: int, num_kv_heads: int):
        self.sp = sp
        self.kv_repeat = kv_replication(sp, num_heads, num_kv_heads)
        self.exchange = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    @staticmethod
    def _local(q, k, v, cu_seqlens, max_seqlen, layer, scale):
        B, L, _, D = q.shape
        out = attend_varlen(q.reshape(B * L, -1, D), k.reshape(B * L, -1, D), v.reshape(B * L, -1, D),
                            cu_seqlens, max_seqlen, layer, softmax_scale=scale)
        return out.view(B, L, -1, D)

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, layer, scale):
        if self.kv_repeat > 1:
            k = k.repeat_interleave(self.kv_repeat, dim=2)
            v = v.repeat_interleave(self.kv_repeat, dim=2)
        return self.exchange(q.contiguous(), k.contiguous(), v.contiguous(), 0, None,
                             cu_seqlens, max_seqlen, layer, scale)


def apply_sequence_parallel(model: torch.nn.Module, sp: int) -> None:
    """Make every attention module of `model` run Ulysses over this rank's group of `sp` (1: off)."""
    contexts = [attention_context(m) for m in attention_modules(model)]
    if sp == 1:
        for c in contexts:
            c.sequence_parallel = None
        return
    group = sequence_parallel_group(sp)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for c in contexts:
        c.sequence_parallel = UlyssesAttention(group, sp, heads, kv_heads)


def shard_batch(batch: dict, sp_rank: int, sp: int) -> dict:
    """This rank's slice of every row. Labels are already shifted, so no token loses its target at a
    shard edge; cu_seqlens/max_seqlen stay global (attention sees the whole sequence)."""
    if sp == 1:
        return batch
    L = batch["input_ids"].shape[1]
    if L % sp:
        raise ValueError(f"a pack of {L} tokens cannot be split over sequence_parallel={sp}")
    part = L // sp
    out = dict(batch)
    for key in SHARDED_KEYS:
        out[key] = batch[key][:, sp_rank * part:(sp_rank + 1) * part].contiguous()
    return out
