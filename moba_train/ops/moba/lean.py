"""Memory-lean MoBA in plain PyTorch: exact, differentiable, no T x T tensor anywhere.

Work is split into tiles whose score matrix holds at most SCORE_BUDGET elements, so peak memory
is the inputs, the outputs and O(tile), not O(T^2):

* own block: each query attends the keys of its own block causally; tiles are a few blocks x one
  KV head x a range of query rows, gathered from a padded [blocks, block_size] index;
* selected blocks: the (query row, block) pairs chosen by the gate are sorted by (block, KV head),
  so every block meets all the queries that chose it in one dense matmul (MoonshotAI's grouping).

The two parts merge through an online softmax. Backward recomputes the scores tile by tile from
the saved log-sum-exp (FlashAttention-2's scheme): memory stays O(T x heads x head_dim + tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import BlockLayout, compute_dtype
from .routing import select_blocks

# Elements of one fp32 score tile; a few tiles (scores, probs, their grads) are alive at once.
SCORE_BUDGET = 1 << 22


@dataclass
class _Plan:
    """Index structures of one call, reused by the backward pass."""

    layout: BlockLayout
    heads: int                      # Hq
    kv_heads: int                   # Hkv
    scale: float
    pad_index: torch.Tensor         # [NB, block_size] token of each block slot (clamped)
    pad_valid: torch.Tensor         # [NB, block_size] whether the slot holds a real token
    sorted_rows: torch.Tensor       # [P] flat query rows (token * Hq + head), grouped by segment
    segments: list[tuple[int, int, int, int]]  # (block, kv_head, first, count) into sorted_rows

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _make_plan(q, k, layout: BlockLayout, selected: torch.Tensor, scale: float) -> _Plan:
    T, Hq, _ = q.shape
    Hkv = k.shape[1]
    bs = layout.block_size
    slots = torch.arange(bs, device=q.device)
    pad_index = layout.block_start[:, None] + slots[None, :]
    pad_valid = slots[None, :] < layout.block_len[:, None]
    pad_index = torch.where(pad_valid, pad_index, layout.block_start[:, None])

    flat = selected.reshape(-1)
    picked = (flat >= 0).nonzero().squeeze(1)
    rows = picked // max(1, selected.shape[2])          # token * Hq + head
    key = flat[picked] * Hkv + (rows % Hq) // (Hq // Hkv)
    key, order = torch.sort(key, stable=True)
    sorted_rows = rows[order]
    segments = []
    if key.numel():
        ids, counts = torch.unique_consecutive(key, return_counts=True)
        first = 0
        for seg, n in zip(ids.tolist(), counts.tolist()):
            segments.append((seg // Hkv, seg % Hkv, first, n))
            first += n
    return _Plan(layout, Hq, Hkv, scale, pad_index, pad_valid, sorted_rows, segments)


def _own_block_tiles(plan: _Plan):
    """Yield (kv_head, query slots [n, r], key slots [n, r1], query valid [n, r], key valid [n, r1], r0)."""
    bs = plan.layout.block_size
    g = plan.group
    rows = max(1, min(bs, SCORE_BUDGET // (g * bs)))
    n_blocks = max(1, SCORE_BUDGET // (g * rows * bs))
    NB = plan.layout.num_blocks
    for h in range(plan.kv_heads):
        for b0 in range(0, NB, n_blocks):
            b1 = min(NB, b0 + n_blocks)
            for r0 in range(0, bs, rows):
                r1 = min(bs, r0 + rows)
                idx, valid = plan.pad_index[b0:b1], plan.pad_valid[b0:b1]
                yield h, idx[:, r0:r1], idx[:, :r1], valid[:, r0:r1], valid[:, :r1], r0


def _own_block_scores(q, k, plan, h, q_slots, k_slots, q_valid, k_valid, r0, cdt):
    """Scores [n, r, G, r1] of a tile, masked causal within the block and to real keys."""
    g = plan.group
    qt = q[q_slots, h * g:(h + 1) * g].to(cdt)               # [n, r, G, D]
    kt = k[k_slots, h].to(cdt)                               # [n, r1, D]
    s = torch.einsum("nrgd,nkd->nrgk", qt * plan.scale, kt)
    r, r1 = q_slots.shape[1], k_slots.shape[1]
    causal = (torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r0 + r, device=q.device)[:, None])
    allowed = causal[None, :, None, :] & k_valid[:, None, None, :]
    return s.masked_fill_(~allowed, float("-inf")), qt, kt


def _segment_tiles(plan: _Plan):
    """Yield (block token range start, kv_head, flat query rows) for each selected block, chunked."""
    bs = plan.layout.block_size
    rows_per_tile = max(1, SCORE_BUDGET // bs)
    starts = plan.layout.block_start.tolist() if plan.segments else []
    for block, h, first, count in plan.segments:
        for c0 in range(first, first + count, rows_per_tile):
            c1 = min(first + count, c0 + rows_per_tile)
            yield starts[block], h, plan.sorted_rows[c0:c1]


def _forward(q, k, v, plan: _Plan):
    T, Hq, D = q.shape
    cdt = compute_dtype(q.dtype)
    g, bs = plan.group, plan.layout.block_size
    acc = torch.zeros(T * Hq, D, dtype=cdt, device=q.device)
    row_max = torch.full((T * Hq,), float("-inf"), dtype=cdt, device=q.device)
    row_sum = torch.zeros(T * Hq, dtype=cdt, device=q.device)

    # Own block first: every query row gets its first contribution here, so plain assignment.
    head_offsets = torch.arange(g, device=q.device)
    for h, q_slots, k_slots, q_valid, k_valid, r0 in _own_block_tiles(plan):
        s, _, _ = _own_block_scores(q, k, plan, h, q_slots, k_slots, q_valid, k_valid, r0, cdt)
        m = s.amax(-1)                                            # [n, r, G]
        p = s.sub_(m[..., None]).exp_()
        o = torch.einsum("nrgk,nkd->nrgd", p, v[k_slots, h].to(cdt))
        tokens = q_slots[q_valid]                                 # [m]
        rows = (tokens[:, None] * Hq + h * g + head_offsets[None, :]).reshape(-1)
        acc[rows] = o[q_valid].reshape(-1, D)
        row_max[rows] = m[q_valid].reshape(-1)
        row_sum[rows] = p.sum(-1)[q_valid].reshape(-1)

    q_rows = q.reshape(T * Hq, D)
    for start, h, rows in _segment_tiles(plan):
        kt = k[start:start + bs, h].to(cdt)
        vt = v[start:start + bs, h].to(cdt)
        s = (q_rows[rows].to(cdt) * plan.scale) @ kt.T           # [n, bs]
        m_old = row_max[rows]
        m_new = torch.maximum(m_old, s.amax(-1))
        alpha = torch.exp(m_old - m_new)
        p = s.sub_(m_new[:, None]).exp_()
        row_sum[rows] = row_sum[rows] * alpha + p.sum(-1)
        acc[rows] = acc[rows] * alpha[:, None] + p @ vt
        row_max[rows] = m_new

    out = (acc / row_sum[:, None]).reshape(T, Hq, D)
    lse = row_max + torch.log(row_sum)
    return out, lse


def _backward(q, k, v, out, lse, dout, plan: _Plan):
    T, Hq, D = q.shape
    cdt = compute_dtype(q.dtype)
    g, bs = plan.group, plan.layout.block_size
    dout_rows = dout.reshape(T * Hq, D).to(cdt)
    delta = (dout_rows * out.reshape(T * Hq, D).to(cdt)).sum(-1)  # rowsum(dO * O)
    dq = torch.zeros(T * Hq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)

    head_offsets = torch.arange(g, device=q.device)
    for h, q_slots, k_slots, q_valid, k_valid, r0 in _own_block_tiles(plan):
        s, qt, kt = _own_block_scores(q, k, plan, h, q_slots, k_slots, q_valid, k_valid, r0, cdt)
        rows = q_slots[..., None] * Hq + h * g + head_offsets            # [n, r, G]
        p = s.sub_(lse[rows][..., None]).exp_().mul_(q_valid[:, :, None, None])
        do = dout_rows[rows]                                             # [n, r, G, D]
        vt = v[k_slots, h].to(cdt)
        ds = torch.einsum("nrgd,nkd->nrgk", do, vt).sub_(delta[rows][..., None]).mul_(p)  # unscaled
        dq.index_add_(0, rows[q_valid].reshape(-1),
                      torch.einsum("nrgk,nkd->nrgd", ds, kt)[q_valid].reshape(-1, D), alpha=plan.scale)
        key_tokens = k_slots.reshape(-1)       # padded slots carry zero probability, so adding is harmless
        dk[:, h].index_add_(0, key_tokens, torch.einsum("nrgk,nrgd->nkd", ds, qt).reshape(-1, D), alpha=plan.scale)
        dv[:, h].index_add_(0, key_tokens, torch.einsum("nrgk,nrgd->nkd", p, do).reshape(-1, D))

    q_rows = q.reshape(T * Hq, D)
    for start, h, rows in _segment_tiles(plan):
        kt = k[start:start + bs, h].to(cdt)
        vt = v[start:start + bs, h].to(cdt)
        qr = q_rows[rows].to(cdt)
        do = dout_rows[rows]
        p = ((qr * plan.scale) @ kt.T).sub_(lse[rows][:, None]).exp_()
        ds = (do @ vt.T).sub_(delta[rows][:, None]).mul_(p)                # unscaled
        dq.index_add_(0, rows, ds @ kt, alpha=plan.scale)
        dk[start:start + bs, h].addmm_(ds.T, qr, alpha=plan.scale)
        dv[start:start + bs, h].addmm_(p.T, do)
    return dq.reshape(T, Hq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _LeanMoBA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        with torch.no_grad():
            out, lse = _forward(q, k, v, plan)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.plan)
        return dq, dk, dv, None


def moba_lean(q, k, v, layout: BlockLayout, *, topk: int, softmax_scale: float,
              centroids: str = "reference") -> torch.Tensor:
    selected = select_blocks(q, k, layout, topk, centroids)
    plan = _make_plan(q, k, layout, selected, softmax_scale)
    return _LeanMoBA.apply(q, k, v, plan)
