"""MoBA backend `triton`: routing, grouping and attention as Triton kernels (tuned for Hopper).

Per call: the tiled gate (triton_routing.py) picks each query's blocks; the (row, block) pairs are
sorted by (KV head, block, slot) into one int32 list, so every key block finds the rows that chose
it in a contiguous range (dense tiles for the tensor cores, no per-element masks); then the
kernels of triton_kernels.py run forward, and backward by recomputation. Extra memory beyond
FlashAttention-2's: the selection [T, Hq, topk-1], the pair list and its tile table (int32), and
the fp32 row state [rows, D + 2] of one span of blocks at a time (TileConfig.row_state_bytes; the
forward and dq run span by span). The forward reads key/value tiles by TMA copies (Hopper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import BlockLayout

try:
    import triton

    from triton.tools.tensor_descriptor import TensorDescriptor

    from . import triton_kernels as kernels
    from . import triton_routing as routing
except ImportError as err:  # reported by missing(), never at import
    triton = None
    _IMPORT_ERROR = err
else:
    _IMPORT_ERROR = None

MAX_HEAD_DIM = 256


def missing() -> str | None:
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR}): pip install 'moba-train[triton]'"
    if not torch.cuda.is_available() and not _interpreted():
        return "no CUDA device: the triton backend runs on NVIDIA GPUs (or under TRITON_INTERPRET=1 for tests)"
    return None


def _interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    """Tile shapes and launch settings of the kernels (rows x keys per matrix product)."""

    route_m: int = 64        # gate: queries x candidate blocks per step
    route_n: int = 32
    pair_m: int = 128        # rows per pair tile (forward and dq waves share the tile list)
    fwd_n: int = 64          # keys per step, forward (pair and own tiles)
    own_m: int = 128         # rows (tokens x G heads) per own-block tile
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_n: int = 64           # keys per step of the dq kernels
    dq_warps: int = 8
    dq_stages: int = 2
    dkv_m: int = 64          # rows per step of the dk/dv loop
    dkv_n: int = 128         # keys per dk/dv program
    dkv_warps: int = 8
    dkv_stages: int = 2
    row_state_bytes: int = 2304 * 2**20  # fp32 per-row buffers (forward state, dq accumulator) per span of blocks
    # Key/value tiles by TMA copies (Hopper's tensor memory accelerator) through a [T, Hkv, D] descriptor instead of
    # per-element addresses and masks. H100, 2026-12-07: the forward 5-12% faster over setting (a), dq neutral to 6%
    # slower, hence on in the forward only (docs/kernel-notes.md, "Keys and values by TMA").
    fwd_kv_descriptors: bool = True
    dq_kv_descriptors: bool = False
    # The gate's scores by one product in the inputs' bf16/fp16 where the block means are rounded to it (exact:
    # triton_routing.py) instead of three tf32 products. Off until measured and GPU-tested (docs/kernel-notes.md,
    # "The gate's product in the inputs' dtype").
    gate_in_input_dtype: bool = False


# Tiles by head dim (BLOCK_D = the next power of two >= head_dim; 80, 96 and 192 run padded, masked to head_dim).
# The 128-row tiles of BLOCK_D <= 128 ask for up to 256 KiB of shared memory at BLOCK_D 256, past the H100/H200's
# 227 KiB: there rows and keys per step are halved and the pipelines take two stages (benchmarks/triton_tiles.py:
# 148 ms fwd+bwd at head_dim 256, 32K tokens, 32/8 heads, block 512, top-8 on the H200; 170 ms with one-stage dq/dk/dv).
TILES_BY_BLOCK_D = {
    128: TileConfig(),
    256: TileConfig(route_m=32, route_n=32, pair_m=64, fwd_n=32, own_m=64, fwd_warps=8, fwd_stages=2,
                    dq_n=32, dq_warps=8, dq_stages=2, dkv_m=32, dkv_n=64, dkv_warps=8, dkv_stages=2),
}


def tiles_for(head_dim: int) -> TileConfig:
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return TILES_BY_BLOCK_D[128 if block_d <= 128 else 256]


# Tests and benchmarks set this to force one TileConfig (small tiles make loops take several steps on tiny
# inputs); None: tiles_for(head_dim).
CONFIG: TileConfig | None = None


@dataclass
class _Grouping:
    """The (row, block) pairs of some rows, sorted by (KV head, block, slot, row); rows count from the first row of
    the tokens they were grouped for."""

    pair_rows: torch.Tensor       # [P] int32 rows (t * Hq + hq), sorted by (hkv, block, slot, row)
    tiles: torch.Tensor           # [n_tiles, 4] int32 (block, hkv, first pair, count), wave-major
    wave_tiles: list[int]         # tiles per wave (slot)
    group_first: torch.Tensor     # [Hkv * NB] int32 first pair of each (hkv, block)
    group_count: torch.Tensor     # [Hkv * NB] int32 pairs of each (hkv, block)
    group_order: torch.Tensor     # [Hkv * NB] int32 groups by descending pair count (dk/dv scheduling)


@dataclass
class _Plan:
    """Routing and its grouping for one call, reused by the backward pass.

    The forward and the backward's dq run span by span: whole blocks whose rows' fp32 state (the forward's max, sum
    and acc; dq's accumulator) fits `config.row_state_bytes`, so no fp32 buffer covers more rows than that (a 1M-token
    forward would otherwise keep 2x its output's size in fp32 state). With one span the selection and the grouping of
    all rows are made once and serve every pass; with several, each span is grouped (and, when no gradient is needed,
    routed) on its own, and dk/dv group all rows from the kept selection."""

    layout: BlockLayout
    block_start: torch.Tensor     # [NB] int32
    block_len: torch.Tensor       # [NB] int32
    block_doc_first: torch.Tensor  # [NB] int32 first block of each block's document
    n_select: int
    spans: list[tuple[int, int, int, int]]  # (first block, end block, first token, end token)
    sel: torch.Tensor | None      # [T, Hq, n_select] int32, -1 only at the tail; None: routed span by span
    grouping: _Grouping | None    # of all rows (one span), else made when needed
    scale: float
    config: TileConfig
    centroids: str


def _check(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton MoBA backend takes float16, bfloat16 or float32, got {q.dtype}; "
                         f"use backend='lean' for {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the triton MoBA backend takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}; use backend='lean'")
    if q.shape[0] * q.shape[1] >= 2**31:
        raise ValueError(f"tokens x query heads must be < 2^31 for the triton MoBA backend (int32 row ids), "
                         f"got {q.shape[0]} x {q.shape[1]}; split the batch")


def _group_pairs(sel: torch.Tensor, hq: int, hkv: int, nb: int, pair_m: int):
    """Sort the (row, slot, block) pairs by (hkv, block, slot, row) and cut them into wave-major tiles."""
    R, n_select = sel.shape[0] * sel.shape[1], sel.shape[2]
    n_groups = hkv * nb * n_select
    if n_groups >= 2**31 - 1:
        raise ValueError(f"KV heads x blocks x (topk-1) = {n_groups} must be < 2^31 for the triton MoBA backend; "
                         f"use a larger block_size or a smaller topk")
    device = sel.device
    flat = sel.view(R, n_select)
    # key = (hkv * NB + block) * n_select + slot; an empty slot sorts last. A stable sort keeps the
    # rows of a key in ascending order: the whole order is fixed, so the backward is deterministic.
    rows = torch.arange(R, device=device, dtype=torch.int32)
    key = ((rows // (hq // hkv)) % hkv)[:, None] * nb + flat
    key.mul_(n_select).add_(torch.arange(n_select, device=device, dtype=torch.int32))
    key.masked_fill_(flat < 0, 2**31 - 1)
    key, order = torch.sort(key.view(-1), stable=True)
    n_pairs = int((flat >= 0).sum())
    pair_rows = (order[:n_pairs] // n_select).to(torch.int32)
    del order
    bounds = torch.searchsorted(key[:n_pairs], torch.arange(n_groups + 1, device=device, dtype=torch.int32))
    del key
    counts = bounds.diff().view(hkv * nb, n_select)
    first = bounds[:-1].view(hkv * nb, n_select)

    # Tiles, wave-major: wave s holds the slot-s pairs of every group, cut into pair_m rows.
    cnt_w, first_w = counts.t().flatten(), first.t().flatten()            # [(slot, group)]
    n_tiles = (cnt_w + pair_m - 1) // pair_m
    wave_tiles = n_tiles.view(n_select, hkv * nb).sum(1).tolist()
    total = sum(wave_tiles)
    owner = torch.repeat_interleave(torch.arange(cnt_w.numel(), device=device), n_tiles, output_size=total)
    nth = torch.arange(total, device=device) - (n_tiles.cumsum(0) - n_tiles)[owner]
    grp = owner % (hkv * nb)
    tiles = torch.stack([grp % nb, grp // nb, first_w[owner] + nth * pair_m,
                         torch.clamp(cnt_w[owner] - nth * pair_m, max=pair_m)], dim=1).to(torch.int32)

    group_count = counts.sum(1)
    group_order = torch.sort(group_count, descending=True, stable=True).indices.to(torch.int32)
    return _Grouping(pair_rows, tiles, wave_tiles, first[:, 0].to(torch.int32), group_count.to(torch.int32),
                     group_order)


def _no_pairs(hkv: int, nb: int, device) -> _Grouping:
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    zeros = torch.zeros(hkv * nb, dtype=torch.int32, device=device)
    return _Grouping(empty, empty.view(0, 4), [], zeros, zeros, torch.arange(hkv * nb, dtype=torch.int32, device=device))


def _spans(layout: BlockLayout, heads: int, head_dim: int, budget: int) -> list[tuple[int, int, int, int]]:
    """Runs of whole blocks (first block, end block, first token, end token) of at most `budget` bytes of fp32 row state
    each (a block larger than that is a span of its own), from the host's copy of the boundaries: no device sync."""
    T, NB = layout.num_tokens, layout.num_blocks
    per_token = heads * (head_dim + 2) * 4
    max_tokens = max(1, budget // per_token)
    if T <= max_tokens:
        return [(0, NB, 0, T)]
    cu, bs = layout.cu_seqlens, layout.block_size
    starts = [t for a, b in zip(cu, cu[1:]) for t in range(a, b, bs)] + [T]
    assert len(starts) == NB + 1, (len(starts), NB)
    spans, b0 = [], 0
    while b0 < NB:
        b1 = b0 + 1
        while b1 < NB and starts[b1 + 1] - starts[b0] <= max_tokens:
            b1 += 1
        spans.append((b0, b1, starts[b0], starts[b1]))
        b0 = b1
    return spans


def make_plan(q, k, layout: BlockLayout, topk: int, softmax_scale: float, sel: torch.Tensor | None = None,
              config: TileConfig | None = None, centroids: str = "reference", keep_selection: bool = True) -> _Plan:
    """Route (or take a given selection [T, Hq, >= n_select], -1 only at the tail) and group the pairs.
    keep_selection=False (no gradient will be asked for): a forward of several spans routes each span on its own."""
    config = config or CONFIG or tiles_for(q.shape[-1])
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    NB = layout.num_blocks
    bounds = layout.doc_first_block
    max_blocks = max(b - a for a, b in zip(bounds, bounds[1:]))
    n_select = min(topk - 1, max_blocks - 1)
    block_start = layout.block_start.to(torch.int32)
    block_len = layout.block_len.to(torch.int32)
    block_doc_first = layout.token_doc_first_block[layout.block_start].to(torch.int32)
    spans = _spans(layout, Hq, D, config.row_state_bytes)
    plan = _Plan(layout, block_start, block_len, block_doc_first, n_select, spans, None, None, softmax_scale, config,
                 centroids)
    if sel is not None:
        plan.sel = sel[..., :n_select].to(torch.int32).contiguous()
    elif keep_selection or len(spans) == 1:
        plan.sel = _route(q, k, plan)
    if len(spans) == 1:
        plan.grouping = _group(plan.sel, Hq, Hkv, plan)
    return plan


def _route(q, k, plan: _Plan, span=None, means=None) -> torch.Tensor:
    c = plan.config
    return routing.select_blocks(q.detach(), k.detach(), plan.block_start, plan.block_len, plan.block_doc_first,
                                 plan.layout.block_size, plan.n_select, c.route_m, c.route_n, plan.centroids,
                                 means=means, span=span, input_dtype_dot=c.gate_in_input_dtype)


def _group(sel: torch.Tensor, Hq: int, Hkv: int, plan: _Plan) -> _Grouping:
    NB = plan.layout.num_blocks
    return _group_pairs(sel, Hq, Hkv, NB, plan.config.pair_m) if plan.n_select else _no_pairs(Hkv, NB, sel.device)


def _dims(q, k):
    T, Hq, D = q.shape
    return T, Hq, k.shape[1], Hq // k.shape[1], D, triton.next_power_of_2(max(D, 16))


def _precision(dtype) -> str:
    # fp32 inputs get exact fp32 products; 16-bit inputs use the tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


def _own_grid(plan: _Plan, G: int, block_m: int):
    """(rows per tile, tokens per tile, tiles per block): a tile holds whole tokens (all G heads)."""
    block_m = max(block_m, triton.next_power_of_2(G))
    tok_per_tile = block_m // G
    return block_m, tok_per_tile, -(-plan.layout.block_size // tok_per_tile)


def _kv_sources(k, v, block_n: int, block_d: int, use: bool):
    """What a kernel reads keys and values through: TMA descriptors whose box is [block_n keys, 1 head, block_d]
    (`use`, 2-byte elements, and rows of Hkv x D a multiple of 16 bytes, which TMA requires), else the tensors
    themselves. fp32 keeps plain loads: its TMA staging buffers are twice as large, and at BLOCK_D 128 the forward
    asked for 262,688 bytes of shared memory, past the H100's 232,448 (2026-12-07)."""
    T, Hkv, D = k.shape
    if not use or k.element_size() > 2 or (Hkv * D * k.element_size()) % 16:
        return k, v, False
    # TMA also wants a 16-byte aligned base: a contiguous view at an odd offset is copied (once per call).
    k, v = (x if x.data_ptr() % 16 == 0 else x.clone() for x in (k, v))
    k_src, v_src = (TensorDescriptor(x, shape=[T, Hkv, D], strides=[Hkv * D, D, 1], block_shape=[block_n, 1, block_d])
                    for x in (k, v))
    return k_src, v_src, True


def _waves(grouping: _Grouping):
    """(wave index, first tile, tile count) of each non-empty wave, in order."""
    base = 0
    for s, n in enumerate(grouping.wave_tiles):
        if n:
            yield s, base, n
        base += n


def forward(q, k, v, plan: _Plan):
    T, Hq, Hkv, G, D, BD = _dims(q, k)
    c, prec = plan.config, _precision(q.dtype)
    scale2 = plan.scale * math.log2(math.e)
    out = torch.empty_like(q)
    lse = torch.empty(T * Hq, dtype=torch.float32, device=q.device)
    means = None
    if plan.sel is None and plan.n_select:      # routed span by span: the block means once
        means = routing.block_means(k.detach(), plan.block_start, plan.block_len, plan.centroids)
    own_m, tok_per_tile, chunks = _own_grid(plan, G, c.own_m)
    k_src, v_src, kv_desc = _kv_sources(k, v, c.fwd_n, BD, c.fwd_kv_descriptors)
    for span in plan.spans:
        b0, b1, t0, t1 = span
        if len(plan.spans) == 1:
            sel, grouping = plan.sel, plan.grouping
        else:
            sel = plan.sel[t0:t1] if plan.sel is not None else _route(q, k, plan, span, means)
            grouping = _group(sel, Hq, Hkv, plan)
        rows = (t1 - t0) * Hq                   # the span's rows; its state and selection count from its first row
        if plan.n_select:
            acc = torch.empty(rows, D, dtype=torch.float32, device=q.device)
            m = torch.empty(rows, dtype=torch.float32, device=q.device)
            l = torch.empty(rows, dtype=torch.float32, device=q.device)
            for s, base, n in _waves(grouping):
                kernels.fwd_pairs_kernel[(n,)](
                    q[t0:t1], k_src, v_src, acc, m, l, grouping.pair_rows, grouping.tiles, base, plan.block_start,
                    plan.block_len, scale2, Hkv, D, FIRST=s == 0, BLOCK_M=c.pair_m, BLOCK_N=c.fwd_n, BLOCK_D=BD,
                    PRECISION=prec, KV_DESC=kv_desc, num_warps=c.fwd_warps, num_stages=c.fwd_stages)
        else:
            acc = m = l = lse  # never read: no row has a selected block
        kernels.fwd_own_kernel[((b1 - b0) * chunks, Hkv)](
            q, k_src, v_src, out, lse, acc, m, l, sel, plan.block_start, plan.block_len, scale2, Hq, Hkv, G, D,
            plan.n_select, tok_per_tile, chunks, b0, t0 * Hq, BLOCK_M=own_m, BLOCK_N=c.fwd_n, BLOCK_D=BD,
            PRECISION=prec, KV_DESC=kv_desc, num_warps=c.fwd_warps, num_stages=c.fwd_stages)
        del acc, m, l, grouping
    return out, lse


def backward(q, k, v, out, lse, dout, plan: _Plan):
    T, Hq, Hkv, G, D, BD = _dims(q, k)
    c, prec = plan.config, _precision(q.dtype)
    assert plan.sel is not None, "a forward that needs no gradient keeps no selection, and builds no graph"
    scale2 = plan.scale * math.log2(math.e)
    dout = dout.contiguous()
    delta = torch.empty(T * Hq, dtype=torch.float32, device=q.device)
    kernels.bwd_delta_kernel[(triton.cdiv(T * Hq, 64),)](out, dout, delta, T * Hq, D, BLOCK_M=64, BLOCK_D=BD)

    # dq span by span, as the forward: the fp32 dq accumulator covers one span's rows.
    dq = torch.empty_like(q)
    own_m, tok_per_tile, chunks = _own_grid(plan, G, c.own_m)
    k_src, v_src, kv_desc = _kv_sources(k, v, c.dq_n, BD, c.dq_kv_descriptors)
    for b0, b1, t0, t1 in plan.spans:
        sel = plan.sel[t0:t1]
        grouping = plan.grouping if len(plan.spans) == 1 else _group(sel, Hq, Hkv, plan)
        rows = slice(t0 * Hq, t1 * Hq)
        dq_acc = torch.empty((t1 - t0) * Hq, D, dtype=torch.float32, device=q.device) if plan.n_select else delta
        for s, base, n in _waves(grouping):
            kernels.bwd_dq_pairs_kernel[(n,)](
                q[t0:t1], k_src, v_src, dout[t0:t1], lse[rows], delta[rows], dq_acc, grouping.pair_rows, grouping.tiles, base,
                plan.block_start, plan.block_len, plan.scale, scale2, Hkv, D, FIRST=s == 0, BLOCK_M=c.pair_m,
                BLOCK_N=c.dq_n, BLOCK_D=BD, PRECISION=prec, KV_DESC=kv_desc, num_warps=c.dq_warps,
                num_stages=c.dq_stages)
        kernels.bwd_dq_own_kernel[((b1 - b0) * chunks, Hkv)](
            q, k_src, v_src, dout, lse, delta, dq_acc, dq, sel, plan.block_start, plan.block_len, plan.scale, scale2,
            Hq, Hkv, G, D, plan.n_select, tok_per_tile, chunks, b0, t0 * Hq, BLOCK_M=own_m, BLOCK_N=c.dq_n,
            BLOCK_D=BD, PRECISION=prec, KV_DESC=kv_desc, num_warps=c.dq_warps, num_stages=c.dq_stages)
        del dq_acc, grouping

    # dk/dv by (KV head, block) over every row that chose the block: the grouping of all rows.
    grouping = plan.grouping or _group(plan.sel, Hq, Hkv, plan)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    NB = plan.layout.num_blocks
    chunks = -(-plan.layout.block_size // c.dkv_n)
    kernels.bwd_dkv_kernel[(Hkv * NB * chunks,)](
        q, k, v, dout, lse, delta, dk, dv, grouping.pair_rows, grouping.group_first, grouping.group_count,
        grouping.group_order, plan.block_start, plan.block_len, plan.scale, scale2, Hq, Hkv, G, D, NB, chunks,
        BLOCK_M=c.dkv_m, BLOCK_N=c.dkv_n, BLOCK_D=BD, PRECISION=prec, num_warps=c.dkv_warps,
        num_stages=c.dkv_stages)
    return dq, dk, dv


class _TritonMoBA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        out, lse = forward(q, k, v, plan)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*backward(q, k, v, out, lse, dout, ctx.plan), None)


def moba_triton(q, k, v, layout: BlockLayout, *, topk: int, softmax_scale: float, centroids: str = "reference",
                selected: torch.Tensor | None = None) -> torch.Tensor:
    """The operator on Triton kernels. `selected` (tests only) replaces the gate by a given selection."""
    _check(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    plan = make_plan(q, k, layout, topk, softmax_scale, sel=selected, centroids=centroids, keep_selection=needs_grad)
    return _TritonMoBA.apply(q, k, v, plan)


__all__ = ["moba_triton", "missing", "make_plan", "TileConfig", "CONFIG", "tiles_for"]
