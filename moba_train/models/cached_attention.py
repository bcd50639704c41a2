"""Attention over a KV cache (generation: fewer queries than keys), dense or sparse MoBA.

The S queries are the last S cache slots, so causality is bottom-right. Each batch row holds one
sequence, possibly left-padded (`key_valid` False on padding). How a layer decodes
(`cached_kind`): full layers, and MoBA layers whose plan says `decode: full` (the paper's setting),
attend densely; MoBA layers with `decode: moba` keep MoBA's rule: a query attends its own block
causally plus the topk - 1 earlier blocks whose mean key scores highest, blocks counted from the
row's first real token, exactly as the operator does over the whole sequence. The sparse path
scores the block means kept in a `BlockMeans` (updated as blocks complete) and gathers only the
chosen blocks' keys and values.

What runs a sparse step is the plan's `decode_backend` (`DECODE_BACKENDS`): `torch`, the PyTorch ops
below (any device, any number of new tokens), or `triton`, the fused kernel (three launches per layer and step)
(`moba_train.ops.moba.decode_triton`) for steps of one new token per row; a step of several (assisted
decoding, a prefill over a filled cache) runs the PyTorch ops. `auto` is `triton` on a CUDA device where
triton is installed (faster than the PyTorch ops wherever measured: docs/benchmarks.md, Decoding), else `torch`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .decode_cache import BlockMeans
from .plan import LayerAttention

log = logging.getLogger(__name__)

# Keys gathered for a chunk of queries of the sparse path: at most this many elements.
GATHER_ELEMENTS = 1 << 24
_told: set[str] = set()       # one-time notes already logged


# SDPA's kernels for a decoding step on CUDA. With SDPA's own choice, a call whose key length differs from the last
# one's costs 45-65 ms on the host (H100, torch 2.11, 32/8 heads of 128, masked or not: 0.08-1.5 ms at a repeated
# length), and a decoding step's key length is new at every step (docs/benchmarks.md, "The dense step's fixed cost").
# Unmasked: FlashAttention's kernel (it takes GQA inside): 0.13-0.28 ms a call over a growing cache.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Masked (a left-padded batch): FlashAttention takes no mask, and the efficient kernel, next in the list above, took
# 4-62 ms a call; cuDNN's took 0.23-1.6 ms, as fast as its repeated-length call under SDPA's own choice.
MASKED_DECODE_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_sdpa_backends(device: torch.device, masked: bool = False):
    """The context a decoding step's SDPA call runs in: the lists above on CUDA, SDPA's own choice elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(MASKED_DECODE_SDPA_BACKENDS if masked else DECODE_SDPA_BACKENDS)


def _attend_dense(query, key, value, key_valid, layer, softmax_scale, block_means=None) -> torch.Tensor:
    B, _, S, _ = query.shape
    K = key.shape[2]
    if key_valid is None and S == 1:
        # The one query is the last slot and sees every key: no mask, so SDPA may pick its fastest kernel.
        with decode_sdpa_backends(key.device):
            out = F.scaled_dot_product_attention(query, key, value, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)
    if key_valid is None:
        key_valid = torch.ones(B, K, dtype=torch.bool, device=key.device)
    query_slot = torch.arange(K - S, K, device=key.device)
    causal = torch.arange(K, device=key.device)[None, :] <= query_slot[:, None]          # [S, K]
    allowed = causal[None, None] & key_valid[:, None, None, :]
    with decode_sdpa_backends(key.device, masked=True):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=softmax_scale,
                                             enable_gqa=True)
    # Padding queries see no key at all; make their (unused) output 0 on every device.
    out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2)


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x [B, H, K, D] as a [rows, D] view (no copy) and the strides of its b, h and slot dims, in rows.

    Rows of D are contiguous in transformers' caches (and slices of them), so that gathering keys is
    an index_select of whole rows: on CPU ~15x faster than torch.gather with an expanded index.
    """
    if x.stride(-1) != 1:
        raise ValueError(f"cached keys/values need unit stride along head_dim, got strides {x.stride()}")
    strides = x.stride()[:3]
    row = math.gcd(*strides)   # every (b, h, slot) starts a whole number of rows in
    n_rows = sum((n - 1) * st for n, st in zip(x.shape[:3], strides)) // row + 1
    return x.as_strided((n_rows, x.shape[3]), (row, 1)), tuple(st // row for st in strides)


@functools.lru_cache(maxsize=64)
def _first_rows(batch: int, heads: int, batch_stride: int, head_stride: int, device: torch.device) -> torch.Tensor:
    """[B, H, 1] row of slot 0 of each (row, head); cached, as decoding asks for the same one every step."""
    return (torch.arange(batch, device=device)[:, None, None] * batch_stride
            + torch.arange(heads, device=device)[None, :, None] * head_stride)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _gather(key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key/value[b, h, slots[b, h, m]] for key/value [B, H, K, D] and slots [B, H, M] -> two [B, H, M, D]."""
    B, H, _, D = key.shape
    picked = []
    index, index_strides = None, None
    for x in (key, value):
        rows, strides = _as_rows(x)
        if strides != index_strides:   # keys and values of one cache share a layout: one index for both
            index = (_first_rows(B, H, strides[0], strides[1], x.device) + slots * strides[2]).reshape(-1)
            index_strides = strides
        picked.append(rows.index_select(0, index).view(B, H, -1, D))
    return picked[0], picked[1]


def _attend_moba_chunk(q, key, value, first_slot: int, means: BlockMeans, n_extra: int, block_size: int,
                       scale: float) -> torch.Tensor:
    """Queries q [B, Hq, C, D] at cache slots first_slot.. -> [B, C, Hq, D]."""
    B, Hq, C, D = q.shape
    Hkv = key.shape[1]
    group = Hq // Hkv
    device = key.device
    padding_queries = first_slot < max(means.pad)       # a row whose sequence starts after this chunk's first slot
    # Earlier blocks of the chunk's first query in the row with most padding: the fewest any query has.
    fewest_candidates = max(first_slot - max(means.pad), 0) // block_size
    slot = torch.arange(first_slot, first_slot + C, device=device)                        # [C]
    position = slot[None, :] - means.pad_slots[:, None]                                   # [B, C]; < 0: padding
    own = position.clamp_min(0) // block_size                                             # [B, C]
    blocks = own[:, None, None, :, None].expand(B, Hkv, group, C, 1)
    if n_extra > 0:
        # MoBA's gate in fp32 (as the operator's): q . block mean over the complete blocks before the query's own.
        n = means.max_complete
        q_gate = q.detach().float().reshape(B, Hkv, group, C, D)
        scores = torch.einsum("bhgcd,bhnd->bhgcn", q_gate, means.means[:, :, :n])
        later = torch.arange(n, device=device)[None, None, :] >= own[:, :, None]          # [B, C, n]
        scores.masked_fill_(later[:, None, None], float("-inf"))
        top, picked = scores.topk(n_extra, dim=-1)
        if fewest_candidates < n_extra:   # some query has fewer earlier blocks: its surplus picks are -inf
            picked = torch.where(torch.isfinite(top), picked, -1)
        blocks = torch.cat([picked, blocks], dim=-1)                                      # [B, Hkv, g, C, E+1]

    key_slot = (means.pad_slots[:, None, None, None, None, None] + blocks[..., None] * block_size
                + _arange(block_size, device))                                            # [B, Hkv, g, C, E+1, bs]
    valid = key_slot <= slot[None, None, None, :, None, None]   # causal in the own block; picked blocks lie before
    if fewest_candidates < n_extra:
        valid &= blocks[..., None] >= 0
    if padding_queries:
        valid &= (position >= 0)[:, None, None, :, None, None]
    width = blocks.shape[-1] * block_size
    # Masked slots may read any key: clamp them into the cache.
    k_sel, v_sel = _gather(key, value, key_slot.clamp(0, key.shape[2] - 1).reshape(B, Hkv, group * C * width))

    attn_rows = B * Hq * C   # one attention row per (batch row, query head, query), over its `width` gathered keys
    mask = valid.view(attn_rows, 1, 1, width)
    out = F.scaled_dot_product_attention(q.reshape(attn_rows, 1, 1, D), k_sel.view(attn_rows, 1, width, D),
                                         v_sel.view(attn_rows, 1, width, D), attn_mask=mask, scale=scale)
    if padding_queries:                                                                   # they see no key: 0
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.view(B, Hq, C, D).transpose(1, 2)


def _attend_moba(query, key, value, key_valid, layer, softmax_scale, block_means: BlockMeans | None) -> torch.Tensor:
    if block_means is None:
        raise ValueError("sparse MoBA decoding needs the cache's BlockMeans (moba_train.models.decode_cache)")
    if block_means.block_size != layer.block_size:
        raise ValueError(f"block means of block size {block_means.block_size} given to a layer with block size "
                         f"{layer.block_size}")
    block_means.update(key, key_valid)
    B, Hq, S, D = query.shape
    K = key.shape[2]
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    if decode_backend(layer, query.device) == "triton":
        if S == 1:
            from ..ops.moba.decode_triton import moba_decode_step

            return moba_decode_step(query, key, value, block_means.means, block_means.pad_slots, layer.block_size,
                                    layer.topk, scale)
        if "several" not in _told:
            _told.add("several")
            log.info("decode_backend=triton: steps with several new tokens per row (here %d) run the PyTorch ops; "
                     "the fused kernel takes one", S)
    n_extra = min(layer.topk - 1, block_means.max_complete)
    width = (n_extra + 1) * layer.block_size
    chunk = max(1, GATHER_ELEMENTS // (B * Hq * width * D))
    outs = [_attend_moba_chunk(query[:, :, s:s + chunk], key, value, K - S + s, block_means, n_extra,
                               layer.block_size, scale)
            for s in range(0, S, chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# How a layer attends over a KV cache, by `cached_kind`.
CACHED_ATTENTION: dict[str, Callable] = {"full": _attend_dense, "moba": _attend_moba}


def _triton_decode_missing(device: torch.device) -> str | None:
    """Why the fused decode kernel cannot run here, with the fix; None when it can."""
    from ..ops.moba import triton as triton_backend

    if triton_backend.triton is None:
        return "triton is not installed: pip install 'moba-train[triton]'"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it runs on CUDA GPUs, the cache is on {device.type}"
    return None


# What runs a sparse MoBA decoding step, by the plan's `decode_backend` (moba_train.models.plan.DECODE_BACKENDS):
# name -> why it cannot run on a device (None: it can).
DECODE_BACKENDS: dict[str, Callable[[torch.device], str | None]] = {
    "torch": lambda device: None,
    "triton": _triton_decode_missing,
}


def decode_backend(layer: LayerAttention, device: torch.device) -> str:
    """The decode backend the layer's plan asks for, resolved. `auto` takes the fused kernel on a CUDA device
    where triton is installed (faster than the PyTorch ops at every measured context, batch and model shape:
    docs/benchmarks.md, Decoding), else the PyTorch ops."""
    name = layer.decode_backend
    if name == "auto":          # the kernel's check runs once; the PyTorch ops run anywhere
        return "triton" if device.type == "cuda" and DECODE_BACKENDS["triton"](device) is None else "torch"
    reason = DECODE_BACKENDS[name](device)
    if reason is not None:
        raise RuntimeError(f"attention.decode_backend={name}: {reason}; set attention.decode_backend=torch")
    return name


def cached_kind(layer: LayerAttention) -> str:
    """'moba' for MoBA layers that decode sparsely, else 'full'."""
    return layer.decode if layer.mode == "moba" else "full"


def attend_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None,
                  layer: LayerAttention, softmax_scale: float | None,
                  block_means: BlockMeans | None = None) -> torch.Tensor:
    """query [B, Hq, S, D], key/value [B, Hkv, K, D] with K >= S; key_valid [B, K] or None. Returns [B, S, Hq, D].

    `block_means` (the cache's, see `decode_cache.cache_block_means`) is needed when
    `cached_kind(layer) == "moba"`; it is brought up to date with the cache here.
    """
    return CACHED_ATTENTION[cached_kind(layer)](query, key, value, key_valid, layer, softmax_scale, block_means)


__all__ = ["CACHED_ATTENTION", "DECODE_BACKENDS", "attend_cached", "cached_kind", "decode_backend"]
