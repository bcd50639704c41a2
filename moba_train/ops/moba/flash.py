"""MoBA backend `flash`: MoonshotAI's "two varlen calls" scheme on flash-attn 2's internal kernels.

Why: it runs FlashAttention-2's tuned CUDA kernels unchanged, as MoonshotAI's `moba_efficient.py`
does, which gives a second GPU implementation, independent of our Triton kernels, to check them
against (and one that works where Triton does not). `auto` never picks it: triton is faster.

Per call:
1. the gate is `routing.select_blocks`, shared with naive/lean/flex, so all attend the same blocks;
2. own block: one causal varlen call in which every (document, block) is its own sequence; GQA is
   flash-attn's own (K/V keep their Hkv heads, never repeated);
3. selected blocks: the (query row, block) pairs are grouped by (block, KV head); each group is one
   varlen sequence of query rows, heads flattened to a single head as MoonshotAI does, against that
   block's keys of that KV head, non-causal (a selected block lies strictly before its queries).
   Grouping by KV head rather than query head gathers each block's K/V once per KV head;
4. both partial outputs merge by log-sum-exp in fp32.
Backward calls flash-attn's varlen backward on both parts with the *merged* output and lse: FA2
recomputes P = exp(S * scale - lse) and uses rowsum(dO * O), so each call returns its share of the
exact gradient of the merged attention; pair gradients are index_added back into dq, dk and dv.
flash-attn is reached only through `_fa_forward` / `_fa_backward`, which adapt to its signatures.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import BlockLayout
from .registry import module_installed
from .routing import select_blocks

SUPPORTED = "flash-attn 2.6.x (window_size=(left, right)) and 2.7.x-2.8.x (window_size_left/right)"

# Test hook, and nothing else: the CPU tests run this module against a PyTorch stand-in of
# flash-attn and set it to False. In the package it stays True: without CUDA the backend is unavailable.
REQUIRE_CUDA = True

# Fixed arguments of flash-attn's internals, by parameter name: dropout, sliding window, softcap,
# ALiBi, paged or left-padded KV all off. Only the names a given version has are passed.
_FIXED = dict(dropout_p=0.0, softcap=0.0, alibi_slopes=None, return_softmax=False, block_table=None,
              leftpad_k=None, seqused_k=None, rng_state=None,
              deterministic=False)  # the index_add_ of the pair gradients is not deterministic on CUDA anyway


def _load_flash_attn():
    """flash-attn's two varlen internals: the one place this module imports flash-attn (tests patch it)."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward
    return _flash_attn_varlen_forward, _flash_attn_varlen_backward


def missing() -> str | None:
    try:
        _load_flash_attn()
    except ImportError as err:
        if not module_installed("flash_attn.flash_attn_interface"):
            return "flash-attn is not installed: pip install 'moba-train[flash]' on a CUDA machine, or use backend='triton'"
        return (f"flash-attn is installed but does not import ({err}): reinstall it built against torch "
                f"{torch.__version__} (pip install --no-build-isolation --force-reinstall 'flash-attn>=2.6'), "
                f"or use backend='triton'")
    if REQUIRE_CUDA and not torch.cuda.is_available():
        return "no CUDA device: flash-attn's kernels run on NVIDIA GPUs only; use backend='lean' on CPU"
    return None


def _kwargs(fn, args: dict) -> tuple[str, dict]:
    """Keyword arguments for flash-attn internal `fn`, and its API generation: "2.6" or "2.7"."""
    # From 2.7 on the internals are torch.library.custom_op objects, whose __call__(*args, **kwargs)
    # hides the signature; the decorated function is kept as _init_fn.
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    if {"window_size_left", "window_size_right"} <= params.keys():
        api, window = "2.7", dict(window_size_left=-1, window_size_right=-1)
    elif "window_size" in params:
        api, window = "2.6", dict(window_size=(-1, -1))
    else:
        api, window = None, {}
    kwargs = {name: value for name, value in {**_FIXED, **window}.items() if name in params}
    kwargs.update(args)
    unknown = [name for name in args if name not in params]
    unfilled = [name for name, p in params.items() if p.default is p.empty and name not in kwargs
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if api is None or "softcap" not in params or unknown or unfilled:
        try:
            version = importlib.metadata.version("flash-attn")
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
        name = getattr(fn, "__name__", type(fn).__name__)
        raise RuntimeError(f"MoBA backend 'flash' does not know the signature of flash-attn {version}'s "
                           f"{name}({', '.join(params)}); it supports {SUPPORTED}: "
                           f"pip install 'flash-attn>=2.6,<2.9', or use backend='triton'")
    return api, kwargs


def _fa_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    """Varlen attention: out [Nq, H, D] in q's dtype and lse [H, Nq] fp32 (flash-attn's layout)."""
    fwd, _ = _load_flash_attn()
    api, kwargs = _kwargs(fwd, dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                    max_seqlen_k=max_k, softmax_scale=scale, causal=causal))
    res = fwd(**kwargs)
    # 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state); 2.7+: (out_padded, lse, S_dmask, rng_state).
    out, lse = (res[0], res[5]) if api == "2.6" else (res[0], res[1])
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"flash-attn returned softmax_lse of shape {tuple(lse.shape)}, expected [heads, tokens] = "
                           f"{[q.shape[1], q.shape[0]]}; supported: {SUPPORTED}")
    return out, lse


def _fa_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    """dq, dk, dv (inputs' dtype) of the attention whose output and lse [H, Nq] are `out` and `lse`."""
    _, bwd = _load_flash_attn()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _, kwargs = _kwargs(bwd, dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                  softmax_scale=scale, causal=causal))
    bwd(**kwargs)  # every supported version writes into the dq, dk, dv it is given
    return dq, dk, dv


@dataclass(frozen=True)
class _Plan:
    """Varlen sequences of both calls; rows are flat indices token * heads + head."""

    own_cu: torch.Tensor        # [NB + 1] int32: every block is its own sequence
    own_max: int
    rows: torch.Tensor          # [P] int64 query rows of the selected pairs, grouped by (block, KV head)
    pair_cu_q: torch.Tensor     # [S + 1] int32
    pair_max_q: int
    kv_rows: torch.Tensor       # [N] int64 key rows (token * Hkv + kv head) of each sequence's block
    pair_cu_k: torch.Tensor     # [S + 1] int32
    pair_max_k: int


def _make_plan(selected: torch.Tensor, layout: BlockLayout, Hq: int, Hkv: int) -> _Plan:
    device = selected.device
    cu = layout.cu_seqlens
    own_cu = torch.cat([layout.block_start, layout.block_start.new_tensor([layout.num_tokens])]).to(torch.int32)
    own_max = max(min(layout.block_size, b - a) for a, b in zip(cu, cu[1:]))

    flat = selected.reshape(-1)
    picked = (flat >= 0).nonzero().squeeze(1)
    rows = picked // max(1, selected.shape[2])
    key = flat[picked] * Hkv + (rows % Hq) // (Hq // Hkv)        # (block, KV head) of each pair
    key, order = torch.sort(key, stable=True)
    rows = rows[order]
    seq, n_q = torch.unique_consecutive(key, return_counts=True)
    block, kv_head = seq // Hkv, seq % Hkv
    n_k = layout.block_len[block]
    cu_k = F.pad(n_k.cumsum(0), (1, 0))
    seq_of_key = torch.repeat_interleave(torch.arange(seq.numel(), device=device), n_k)
    token = layout.block_start[block][seq_of_key] + torch.arange(seq_of_key.numel(), device=device) - cu_k[seq_of_key]
    return _Plan(own_cu, own_max, rows, F.pad(n_q.cumsum(0), (1, 0)).to(torch.int32),
                 int(n_q.max()) if seq.numel() else 0, token * Hkv + kv_head[seq_of_key], cu_k.to(torch.int32),
                 int(n_k.max()) if seq.numel() else 0)


def _pair_inputs(q, k, v, plan: _Plan):
    """Queries [P, 1, D] and keys, values [N, 1, D] of the pair sequences (gathered, 1 head)."""
    D = q.shape[-1]
    return (q.reshape(-1, D)[plan.rows, None], k.reshape(-1, D)[plan.kv_rows, None], v.reshape(-1, D)[plan.kv_rows, None])


class _FlashMoBA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        T, Hq, D = q.shape
        own = (plan.own_cu, plan.own_cu, plan.own_max, plan.own_max, scale)
        out_own, lse_own = _fa_forward(q, k, v, *own, causal=True)
        out = out_own.reshape(T * Hq, D).float()
        lse = lse_own.t().reshape(T * Hq).float()                 # row t * Hq + h, like out
        if plan.rows.numel():
            rows = plan.rows
            pair = (plan.pair_cu_q, plan.pair_cu_k, plan.pair_max_q, plan.pair_max_k, scale)
            out_pair, lse_pair = _fa_forward(*_pair_inputs(q, k, v, plan), *pair, causal=False)
            lse_pair = lse_pair[0].float()
            # Merge: lse = log(sum of exp(part lse)), out = sum of exp(part lse - lse) * part out. The
            # row maximum keeps every exp <= 1 (a pair's lse may exceed the own block's by a lot).
            peak = lse.scatter_reduce(0, rows, lse_pair, "amax")
            total = torch.exp(lse - peak).index_add_(0, rows, torch.exp(lse_pair - peak[rows]))
            merged = peak + torch.log(total)
            out.mul_(torch.exp(lse - merged)[:, None])
            out.index_add_(0, rows, out_pair[:, 0].float() * torch.exp(lse_pair - merged[rows])[:, None])
            lse = merged
        out = out.view(T, Hq, D).to(q.dtype)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        T, Hq, D = q.shape
        dout = dout.contiguous().to(q.dtype)
        own = (plan.own_cu, plan.own_cu, plan.own_max, plan.own_max, scale)
        dq, dk, dv = _fa_backward(dout, q, k, v, out, lse.view(T, Hq).t().contiguous(), *own, causal=True)
        if plan.rows.numel():
            rows = plan.rows
            pair = (plan.pair_cu_q, plan.pair_cu_k, plan.pair_max_q, plan.pair_max_k, scale)
            dq_p, dk_p, dv_p = _fa_backward(dout.view(T * Hq, D)[rows, None], *_pair_inputs(q, k, v, plan),
                                            out.view(T * Hq, D)[rows, None], lse[rows][None], *pair, causal=False)
            # Accumulate in fp32; a block's K/V rows receive the sums over all query heads of the group.
            dq = dq.float().view(T * Hq, D).index_add_(0, rows, dq_p[:, 0].float()).view(T, Hq, D)
            dk = dk.float().view(-1, D).index_add_(0, plan.kv_rows, dk_p[:, 0].float()).view(k.shape)
            dv = dv.float().view(-1, D).index_add_(0, plan.kv_rows, dv_p[:, 0].float()).view(v.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def moba_flash(q, k, v, layout: BlockLayout, *, topk: int, softmax_scale: float,
               centroids: str = "reference") -> torch.Tensor:
    selected = select_blocks(q, k, layout, topk, centroids)
    plan = _make_plan(selected, layout, q.shape[1], k.shape[1])
    D = q.shape[-1]
    # flash-attn 2.7+ wants head_dim % 8 == 0 (its Python wrappers pad, the internals do not);
    # zero columns change no score, and autograd slices the gradients back.
    pad = -D % 8
    if pad:
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = _FlashMoBA.apply(q, k, v, plan, softmax_scale)
    return out[..., :D] if pad else out
