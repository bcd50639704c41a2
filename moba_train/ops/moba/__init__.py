"""The MoBA operator (Mixture of Block Attention, arXiv 2502.13189) in flash-attn's varlen layout."""

from __future__ import annotations

import torch

from . import flash, flex, triton
from .layout import BlockLayout, build_layout, check_inputs, layout_for
from .lean import moba_lean
from .naive import moba_naive
from .registry import BACKENDS, Backend, register, resolve
from .routing import CENTROIDS, block_means, check_centroids, select_blocks

register(Backend("naive", moba_naive, devices=("cpu", "cuda"), auto_rank=None,
                 summary="dense masked attention, O(T^2) memory: the test oracle"))
register(Backend("lean", moba_lean, devices=("cpu", "cuda"), auto_rank=10,
                 summary="tiled PyTorch, memory O(T x topk x block_size), exact backward"))
register(Backend("flex", flex.moba_flex, devices=("cuda",), auto_rank=20, missing=flex.missing,
                 summary="torch FlexAttention with a block mask built from the routing: the baseline to beat"))
register(Backend("triton", triton.moba_triton, devices=("cuda",), auto_rank=30, missing=triton.missing,
                 summary="fused Triton kernels: tiled routing, queries grouped per key block, deterministic backward",
                 dtypes=(torch.float16, torch.bfloat16, torch.float32), max_head_dim=triton.MAX_HEAD_DIM))
register(Backend("flash", flash.moba_flash, devices=("cuda",), auto_rank=None, missing=flash.missing,
                 dtypes=(torch.float16, torch.bfloat16), max_head_dim=256,
                 summary="MoonshotAI's scheme on flash-attn 2: one causal varlen call over the blocks, one over "
                         "the selected (block, KV head) pairs, merged by log-sum-exp"))


def moba_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, block_size: int, topk: int, softmax_scale: float | None = None,
                     backend: str = "auto", centroids: str = "reference") -> torch.Tensor:
    """MoBA attention over packed documents.

    q [T, Hq, D]; k, v [T, Hkv, D] with Hq a multiple of Hkv; cu_seqlens int32 [n_docs + 1].
    A query in block i of its document attends its own block causally plus the topk - 1 earlier
    blocks of the same document whose mean key scores highest against it (all of them when fewer
    exist). topk >= the number of blocks is exactly full causal attention. Returns [T, Hq, D] in q's dtype.
    `centroids` ("reference" | "fp32"): whether a block's mean key is rounded to the input dtype before the
    gate scores it (MoonshotAI's convention, the default) or kept in fp32; see routing.py.
    """
    check_inputs(q, k, v, cu_seqlens, max_seqlen, block_size, topk, softmax_scale)
    check_centroids(centroids)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    chosen = resolve(backend, q.device, q.dtype, head_dim=q.shape[-1])
    layout = layout_for(cu_seqlens, block_size)
    return chosen.fn(q, k, v, layout, topk=topk, softmax_scale=scale, centroids=centroids)


__all__ = ["moba_attn_varlen", "BACKENDS", "Backend", "CENTROIDS", "register", "BlockLayout", "build_layout",
           "block_means", "select_blocks"]
