"""Full causal attention over packed documents, in the same varlen layout as `moba_attn_varlen`.

Layers in "full" mode run this: every query attends the earlier tokens of its own document only.
Backends by name: `sdpa` (torch SDPA per document, CPU and GPU), `varlen` (torch's own varlen
FlashAttention, `torch.nn.attention.varlen`, one call per batch, CUDA 16-bit), `flash` (flash-attn 2's
varlen kernel, CUDA only) and `fa4` (FlashAttention-4's varlen kernel, `pip install 'moba-train[fa4]'`,
Hopper and Blackwell, head_dim 128; on the H200 1.16x cuDNN dense at 128K fwd+bwd). `auto` takes fa4 where
it can run, then flash when installed; else, on GPUs in 16-bit, it looks at the pack: one varlen call when its documents are short (mean under LONG_DOCUMENT tokens: code files, chat
records, where sdpa pays one launch per document and layer), sdpa per document when they are long (SDPA
picks cuDNN, ~1.65x faster than the varlen kernel on one long document). Measured on an H200, fwd+bwd,
32/8 heads of 128 (docs/benchmarks.md): 1x32K sdpa 57 ms, varlen 95 ms; 16x2K sdpa 13.3, varlen 8.1 ms;
128x256 sdpa 68.8, varlen 3.3 ms.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .moba.layout import check_inputs, host_boundaries
from .moba.registry import Backend, BackendRegistry, module_installed

log = logging.getLogger(__name__)

FULL_ATTN_BACKENDS = BackendRegistry("full-attention", log)
LONG_DOCUMENT = 8192    # mean document length from which `auto` prefers sdpa (cuDNN) to one varlen call


# On GPUs in 16-bit, only the fused kernels (O(L) memory) may run: SDPA's math fallback would materialize
# the [H, L, L] scores (128 GiB for one 32K document of 32 heads) without a word.
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


# Every backend takes the validated int32 boundaries as the device tensor: the one-call kernels use it
# as it is (no per-layer host-to-device copy); sdpa reads its host copy, cached on the tensor.

def _sdpa(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    cu = host_boundaries(cu_seqlens)
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


def _flash(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=softmax_scale,
                                  causal=True)


# FlashAttention-4 (flash_attn.cute, CuTe DSL): only head_dim 128 is taken, the one measured on the H200
# (../shared/notes/fa4-h200.md); its 4.0 betas' Hopper backward does not cover smaller heads.
FA4_HEAD_DIMS = (128,)
FA4_INSTALL = "pip install 'moba-train[fa4]'"


@functools.cache
def _fa4_varlen():
    from flash_attn.cute import flash_attn_varlen_func
    return flash_attn_varlen_func


def _fa4(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    result = _fa4_varlen()(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                           max_seqlen_k=max_seqlen, softmax_scale=softmax_scale, causal=True)
    # The 4.0 betas return (out, lse); lse is None unless it is asked for or a gradient needs it.
    return result[0] if isinstance(result, tuple) else result


def _fa4_missing() -> str | None:
    if not module_installed("flash_attn.cute"):
        return f"FlashAttention-4 is not installed; install it with `{FA4_INSTALL}` (NVIDIA Hopper or Blackwell GPUs)"
    if not torch.cuda.is_available():
        return "no CUDA device: FlashAttention-4 runs on NVIDIA Hopper and Blackwell GPUs; use backend 'sdpa'"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10, 11):
        return (f"FlashAttention-4 runs on Hopper and Blackwell GPUs (compute capability 9.x to 11.x), "
                f"not {major}.{minor}; use backend 'varlen' or 'sdpa'")
    return None


@functools.cache
def _varlen_api():
    """torch's varlen_attn and the keywords this torch's version takes (2.9-2.11: is_causal; later:
    window_size, scale and enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    varlen_attn, params = _varlen_api()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)                  # causal
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = softmax_scale
    else:                                                # the kernel scales by D^-0.5: fold the rest into q
        q = q * (softmax_scale * q.shape[-1] ** 0.5)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        # this torch's varlen kernel has no GQA: the KV heads are repeated (memory T x Hq x D, as SDPA's math path)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _varlen_missing() -> str | None:
    try:
        _varlen_api()
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.9); use backend 'sdpa'"
    if not torch.cuda.is_available():
        return "no CUDA device: torch's varlen attention runs FlashAttention kernels on NVIDIA GPUs; use backend 'sdpa'"
    return None


def _flash_missing() -> str | None:
    if not module_installed("flash_attn.flash_attn_interface"):     # flash-attn 2 (not FA4's flash_attn.cute alone)
        return "flash-attn is not installed; install it with `pip install moba-train[flash]` (CUDA machines only)"
    return None


register = FULL_ATTN_BACKENDS.register
resolve = FULL_ATTN_BACKENDS.resolve

register(Backend("sdpa", _sdpa, devices=("cpu", "cuda"), auto_rank=0,
                 summary="torch scaled_dot_product_attention, one call per document"))
register(Backend("varlen", _varlen, devices=("cuda",), auto_rank=5, missing=_varlen_missing,
                 dtypes=(torch.float16, torch.bfloat16),
                 summary="torch.nn.attention.varlen.varlen_attn (FlashAttention), one call per batch"))
register(Backend("flash", _flash, devices=("cuda",), auto_rank=10, missing=_flash_missing,
                 dtypes=(torch.float16, torch.bfloat16),
                 summary="flash_attn.flash_attn_varlen_func, one call per batch"))
register(Backend("fa4", _fa4, devices=("cuda",), auto_rank=20, missing=_fa4_missing,
                 dtypes=(torch.float16, torch.bfloat16), head_dims=FA4_HEAD_DIMS,
                 summary="flash_attn.cute.flash_attn_varlen_func (FlashAttention-4), one call per batch"))


def full_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention within each packed document.

    q [T, Hq, D]; k, v [T, Hkv, D] with Hq a multiple of Hkv (GQA, KV never repeated);
    cu_seqlens int32 [n_docs + 1]. Returns [T, Hq, D] in q's dtype.
    """
    # Full attention has no blocks: block_size=1, topk=1 are always valid, so only the shared checks bite.
    cu = check_inputs(q, k, v, cu_seqlens, max_seqlen, 1, 1, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    chosen = resolve(backend, q.device, q.dtype, head_dim=q.shape[-1])
    if backend == "auto" and chosen.name == "varlen" and q.shape[0] >= LONG_DOCUMENT * (len(cu) - 1):
        chosen = FULL_ATTN_BACKENDS["sdpa"]           # long documents: cuDNN per document beats one varlen call
        log.debug("full-attention backend=auto: documents average >= %d tokens, sdpa per document", LONG_DOCUMENT)
    return chosen.fn(q, k, v, cu_seqlens, max_seqlen, scale)


__all__ = ["full_attn_varlen", "FULL_ATTN_BACKENDS", "register", "resolve"]
