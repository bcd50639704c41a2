"""Full causal attention over packed documents, in the same varlen layout as `moba_attn_varlen`.

Layers in "full" mode run this: every query attends the earlier tokens of its own document only.
Backends by name: `sdpa` (torch SDPA per document, CPU and GPU) and `flash` (flash-attn's varlen
kernel, CUDA only). `auto` takes flash when it can run, else sdpa.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .moba.layout import check_inputs
from .moba.registry import Backend, BackendRegistry

log = logging.getLogger(__name__)

FULL_ATTN_BACKENDS = BackendRegistry("full-attention", log)


# On GPUs in 16-bit, only the fused kernels (O(L) memory) may run: SDPA's math fallback would materialize
# the [H, L, L] scores (128 GiB for one 32K document of 32 heads) without a word.
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _sdpa(q, k, v, cu: list[int], max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    fused_only = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    outs = []
    with sdpa_kernel(FUSED_SDPA) if fused_only else contextlib.nullcontext():
        for start, end in zip(cu, cu[1:]):
            # [L, H, D] -> [1, H, L, D]: the fused kernels take 4-D inputs only; enable_gqa shares KV heads.
            o = F.scaled_dot_product_attention(q[None, start:end].transpose(1, 2), k[None, start:end].transpose(1, 2),
                                               v[None, start:end].transpose(1, 2), is_causal=True, scale=softmax_scale,
                                               enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _flash(q, k, v, cu: list[int], max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    return flash_attn_varlen_func(q, k, v, cu_t, cu_t, max_seqlen, max_seqlen, softmax_scale=softmax_scale,
                                  causal=True)


def _flash_missing() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed; install it with `pip install moba-train[flash]` (CUDA machines only)"
    return None


register = FULL_ATTN_BACKENDS.register
resolve = FULL_ATTN_BACKENDS.resolve

register(Backend("sdpa", _sdpa, devices=("cpu", "cuda"), auto_rank=0,
                 summary="torch scaled_dot_product_attention, one call per document"))
register(Backend("flash", _flash, devices=("cuda",), auto_rank=10, missing=_flash_missing,
                 summary="flash_attn.flash_attn_varlen_func, one call per batch"))


def full_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention within each packed document.

    q [T, Hq, D]; k, v [T, Hkv, D] with Hq a multiple of Hkv (GQA, KV never repeated);
    cu_seqlens int32 [n_docs + 1]. Returns [T, Hq, D] in q's dtype.
    """
    # Full attention has no blocks: block_size=1, topk=1 are always valid, so only the shared checks bite.
    cu = check_inputs(q, k, v, cu_seqlens, max_seqlen, 1, 1, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return resolve(backend, q.device).fn(q, k, v, cu, max_seqlen, scale)


__all__ = ["full_attn_varlen", "FULL_ATTN_BACKENDS", "register", "resolve"]
