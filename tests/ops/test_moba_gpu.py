"""The GPU backends (triton, flex) against the PyTorch ones (naive oracle, lean), on a CUDA device.

Routing: top-k is discontinuous, and the triton gate sums scores in another order than
`routing.select_blocks`, so at these sizes (thousands of queries, hundreds of candidate blocks) some
near-ties flip. Attention is therefore compared *given the same selection* (triton takes
`selected=`; flex, naive and lean share `routing.select_blocks`), and the triton gate is tested on
its own: its choice must be optimal up to rounding, and agree with select_blocks away from ties.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moba_train.ops import moba_attn_varlen
from moba_train.ops.moba import build_layout, select_blocks
from moba_train.ops.moba import triton as triton_backend
from moba_train.ops.moba.flex import moba_flex
from moba_train.ops.moba.lean import moba_lean
from moba_train.ops.moba.naive import moba_naive
from moba_train.ops.moba.routing import block_means
from tests.ops.test_moba import Pack

pytestmark = pytest.mark.gpu

# (pack, (Hq, Hkv), topk): every pack, GQA group 1-8, topk 1 and beyond the block count. "Beyond" stays
# small: the naive oracle builds a [L, L, topk-1] mask.
CASES = {
    "3docs-ragged-bs64-gqa4-top3": (Pack((1000, 3001, 517), 64), (8, 2), 3),
    "3docs-ragged-bs64-mha-top8": (Pack((1000, 3001, 517), 64), (4, 4), 8),
    "docs-shorter-than-block-bs128-gqa8-top2": (Pack((100, 37, 900, 5, 2000), 128), (8, 1), 2),
    "docs-shorter-than-block-bs128-gqa2-top20-beyond-16-blocks": (Pack((100, 37, 900, 5, 2000), 128), (4, 2), 20),
    "one-doc-bs1024-gqa4-top1": (Pack((5000,), 1024), (4, 1), 1),
    "one-doc-bs1024-gqa2-top4": (Pack((5000,), 1024), (4, 2), 4),
    "2docs-bs4096-gqa4-top2": (Pack((9000, 4100), 4096), (4, 1), 2),
    "2docs-bs4096-mha-top4-beyond-3-blocks": (Pack((9000, 4100), 4096), (2, 2), 4),
    "bs80-not-pow2-gqa3-top3": (Pack((1500, 701), 80), (6, 2), 3),
    "bs16-many-blocks-gqa8-top9": (Pack((2000, 333), 16), (8, 1), 9),
}
HEAD_DIM = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(pack: Pack, heads, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T, (hq, hkv) = pack.tokens, heads
    q = torch.randn(T, hq, HEAD_DIM, device="cuda", generator=g)
    k = torch.randn(T, hkv, HEAD_DIM, device="cuda", generator=g)
    v = torch.randn(T, hkv, HEAD_DIM, device="cuda", generator=g)
    dout = torch.randn(T, hq, HEAD_DIM, device="cuda", generator=g).to(dtype)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], dout


def _poison_allocator():
    """Fill the caching allocator's free memory with 0xFF bytes (NaN in fp32, bf16 and fp16), so an
    output element that a kernel forgets to write reads as NaN (torch.empty hands that memory back)."""
    torch.cuda.synchronize()
    small = [torch.full((1 << 17,), -1, dtype=torch.int32, device="cuda") for _ in range(64)]   # small pool
    large = [torch.full((1 << 26,), -1, dtype=torch.int32, device="cuda") for _ in range(4)]   # large pool, 1 GiB
    del small, large


def _run(fn, q, k, v, dout):
    _poison_allocator()
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_matches(got, want, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten or poisoned element)"
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        else:
            # bf16: P is rounded to bf16 before the PV product (as in FlashAttention): relative error ~1e-3.
            assert _rel_err(a, b) < 1e-2, f"{name}: relative error {_rel_err(a, b):.2e}"


def _backend_fn(name, pack, topk, selected=None):
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, torch.device("cuda"))

    def fn(q, k, v):
        scale = q.shape[-1] ** -0.5
        if name == "triton":
            sel = selected if selected is not None else select_blocks(q, k, layout, topk)
            return triton_backend.moba_triton(q, k, v, layout, topk=topk, softmax_scale=scale, selected=sel)
        impl = {"flex": moba_flex, "lean": moba_lean, "naive": moba_naive}[name]
        return impl(q, k, v, layout, topk=topk, softmax_scale=scale)
    return fn


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_matches_naive_given_the_same_routing(case, dtype):
    _check_triton_against_naive(case, dtype)


def _check_triton_against_naive(case, dtype):
    pack, heads, topk = case
    (q, k, v), dout = _inputs(pack, heads, dtype)
    want = _run(_backend_fn("naive", pack, topk), q, k, v, dout)
    got = _run(_backend_fn("triton", pack, topk), q, k, v, dout)
    _assert_matches(got, want, dtype)


@pytest.mark.parametrize("case", ["3docs-ragged-bs64-gqa4-top3", "bs80-not-pow2-gqa3-top3", "2docs-bs4096-gqa4-top2"])
def test_triton_forward_in_spans_matches_naive(case, monkeypatch):
    """A budget of ~700 tokens' fp32 row state: several spans per pack (block 4096: a span per block)."""
    pack, heads, topk = CASES[case]
    budget = 700 * heads[0] * (HEAD_DIM + 2) * 4
    monkeypatch.setattr(triton_backend, "CONFIG", dataclasses.replace(triton_backend.tiles_for(HEAD_DIM),
                                                                      row_state_bytes=budget))
    (q, k, v), dout = _inputs(pack, heads, torch.bfloat16)
    want = _run(_backend_fn("naive", pack, topk), q, k, v, dout)
    got = _run(_backend_fn("triton", pack, topk), q, k, v, dout)
    _assert_matches(got, want, torch.bfloat16)
    with torch.no_grad():                     # routed span by span
        alone = triton_backend.moba_triton(q, k, v, build_layout(pack.cu_seqlens.tolist(), pack.block_size,
                                                                 torch.device("cuda")), topk=topk,
                                           softmax_scale=HEAD_DIM ** -0.5)
    assert _rel_err(alone, want[0]) < 1e-2


def test_a_forward_without_gradients_keeps_its_row_state_within_the_budget(monkeypatch):
    """256K tokens, 16/4 heads of 64: the whole fp32 row state would be 1.1 GB, twice the bf16 output."""
    T, hq, hkv = 1 << 18, 16, 4
    budget = 64 * 2**20
    monkeypatch.setattr(triton_backend, "CONFIG", dataclasses.replace(triton_backend.tiles_for(HEAD_DIM),
                                                                      row_state_bytes=budget))
    q = torch.randn(T, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(T, hkv, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layout = build_layout([0, T], 512, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = triton_backend.moba_triton(q, k, v, layout, topk=8, softmax_scale=0.125)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_bytes = out.numel() * out.element_size()
    assert extra < out_bytes + 4 * budget, f"peaked at {extra / 2**20:.0f} MiB over the inputs"


# Each (shape, dtype) compiles FlexAttention anew (tens of seconds): two cases cover both dtypes.
FLEX_CASES = {"3docs-ragged-bs64-gqa4-top3-fp32": ("3docs-ragged-bs64-gqa4-top3", torch.float32),
              "2docs-bs4096-gqa4-top2-bf16": ("2docs-bs4096-gqa4-top2", torch.bfloat16)}


@pytest.mark.parametrize("case", FLEX_CASES.values(), ids=FLEX_CASES.keys())
def test_flex_matches_naive(case):
    name, dtype = case
    pack, heads, topk = CASES[name]
    (q, k, v), dout = _inputs(pack, heads, dtype)
    want = _run(_backend_fn("naive", pack, topk), q, k, v, dout)
    got = _run(_backend_fn("flex", pack, topk), q, k, v, dout)
    _assert_matches(got, want, dtype)


def test_triton_matches_lean_beyond_the_oracles_reach():
    """64K tokens in 3 documents: the dense oracle would need ~16 GiB per head; lean is exact and lean."""
    pack = Pack((40000, 17000, 8536), 512)
    (q, k, v), dout = _inputs(pack, (8, 2), torch.bfloat16)
    want = _run(_backend_fn("lean", pack, 8), q, k, v, dout)
    got = _run(_backend_fn("triton", pack, 8), q, k, v, dout)
    _assert_matches(got, want, torch.bfloat16)


def test_triton_is_bit_identical_from_run_to_run():
    pack = Pack((30000, 2768), 128)
    (q, k, v), dout = _inputs(pack, (8, 2), torch.bfloat16)
    fn = lambda q, k, v: moba_attn_varlen(q, k, v, pack.cu_seqlens.cuda(), 30000, block_size=128, topk=8,
                                          backend="triton")
    first = _run(fn, q, k, v, dout)
    for _ in range(2):
        again = _run(fn, q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), again, first):
            assert torch.equal(a, b), f"{name} differs between runs"


def test_auto_picks_triton_on_cuda():
    from moba_train.ops.moba.registry import resolve
    assert resolve("auto", torch.device("cuda")).name == "triton"


ROUTING_CASES = {"bs64-gqa4-top4": (Pack((1000, 3001, 517), 64), (8, 2), 4),
                 "bs16-top9": (Pack((2000, 333), 16), (4, 4), 9),
                 "bs1024-top3": (Pack((5000,), 1024), (4, 1), 3)}


@pytest.mark.parametrize("input_dtype_dot", [False, True], ids=["tf32x3", "bf16-product"])
@pytest.mark.parametrize("centroids", ["reference", "fp32"])
@pytest.mark.parametrize("case", ROUTING_CASES.values(), ids=ROUTING_CASES.keys())
def test_triton_gate_picks_the_best_blocks(case, centroids, input_dtype_dot):
    pack, (hq, hkv), topk = case
    (q, k, _), _ = _inputs(pack, (hq, hkv), torch.bfloat16, seed=1)
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, torch.device("cuda"))
    config = dataclasses.replace(triton_backend.tiles_for(HEAD_DIM), gate_in_input_dtype=input_dtype_dot)
    plan = triton_backend.make_plan(q, k, layout, topk, 1.0, config=config, centroids=centroids)
    got = plan.sel.long()
    n_sel = got.shape[-1]
    want = select_blocks(q, k, layout, topk, centroids=centroids)[..., :n_sel]

    # Scores in fp64 of every (token, head, block) against the block means as the convention rounds them
    # ("reference": fp32 means rounded to bf16, the gate's input); -inf where the block is no candidate.
    T, NB = pack.tokens, layout.num_blocks
    means = block_means(k, layout, centroids).double()
    scores = torch.einsum("thd,nhd->thn", q.detach().double(), means.repeat_interleave(hq // hkv, dim=1))
    blocks = torch.arange(NB, device="cuda")
    cand = (blocks[None, :] >= layout.token_doc_first_block[:, None]) & (blocks[None, :] < layout.token_block[:, None])
    scores = scores.masked_fill(~cand[:, None, :], -math.inf)

    n_cand = cand.sum(1)
    filled = (got >= 0).sum(-1)
    assert torch.equal(filled, torch.clamp(n_cand, max=n_sel)[:, None].expand_as(filled)), "wrong number of blocks"
    assert ((got >= 0).long().diff(dim=-1) <= 0).all(), "-1 must only pad the tail"
    padded = torch.where(got >= 0, got, NB)                                                # -1 -> a spare column
    chosen = torch.zeros(T, hq, NB + 1, dtype=torch.bool, device="cuda").scatter_(-1, padded, True)[..., :NB]
    assert (chosen <= cand[:, None, :]).all(), "chose a block outside the query's earlier blocks"
    worst_chosen = scores.masked_fill(~chosen, math.inf).amin(-1)
    best_left = scores.masked_fill(chosen | ~cand[:, None, :], -math.inf).amax(-1)
    tol = 1e-4 * scores.masked_fill(~cand[:, None, :], 0).abs().amax()
    assert (worst_chosen >= best_left - tol).all(), "an unchosen block scores clearly higher than a chosen one"
    same = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
    assert same > 0.99, f"only {same:.4f} of the (token, head) selections agree with select_blocks"


def test_triton_gate_never_stores_a_score_tensor():
    """256K tokens, 8 heads, 4096 blocks: a [heads, tokens, blocks] fp32 tensor would take 32 GiB."""
    T, hq, hkv, bs = 1 << 18, 8, 2, 64
    q = torch.randn(T, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hkv, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    layout = build_layout([0, T], bs, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    plan = triton_backend.make_plan(q, k, layout, 8, 1.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    selection_bytes = plan.sel.numel() * 4          # 56 MiB; the grouping sorts int64 keys of the same count
    assert extra < 16 * selection_bytes, f"routing and grouping peaked at {extra / 2**20:.0f} MiB"


def test_triton_with_its_own_gate_matches_naive_on_separated_gates():
    """End to end through moba_attn_varlen; well-separated block scores, so both gates agree exactly."""
    from tests.ops.test_moba import make_inputs
    pack = Pack((37, 113, 150, 700), 16)
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_inputs(pack, 8, 2, separated=True))
    dout = torch.randn_like(q)
    cu = pack.cu_seqlens.cuda()
    got = _run(lambda q, k, v: moba_attn_varlen(q, k, v, cu, 700, block_size=16, topk=4, backend="triton"), q, k, v, dout)
    want = _run(lambda q, k, v: moba_attn_varlen(q, k, v, cu, 700, block_size=16, topk=4, backend="naive"), q, k, v, dout)
    _assert_matches(got, want, torch.float32)


# Every common head size (Gemma's 256 included), with tiles chosen per head dim, and GQA groups 1 to 8.
HEAD_DIMS = {"d64-gqa1": (64, (4, 4)), "d80-gqa2": (80, (4, 2)), "d96-gqa3": (96, (6, 2)),
             "d128-gqa4": (128, (8, 2)), "d128-gqa7": (128, (7, 1)), "d192-gqa8": (192, (8, 1)),
             "d256-gqa4": (256, (8, 2)), "d256-gqa1": (256, (2, 2))}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("head_dim,heads", HEAD_DIMS.values(), ids=HEAD_DIMS.keys())
def test_triton_runs_every_common_head_dim(head_dim, heads, dtype):
    _check_head_dim_against_naive(head_dim, heads, dtype)
    assert triton_backend.tiles_for(head_dim) == triton_backend.TILES_BY_BLOCK_D[128 if head_dim <= 128 else 256]


def _check_head_dim_against_naive(head_dim, heads, dtype):
    pack, topk = Pack((700, 1300, 45), 128), 3
    g = torch.Generator(device="cuda").manual_seed(3)
    T, (hq, hkv) = pack.tokens, heads
    q, k, v = (torch.randn(T, h, head_dim, device="cuda", generator=g).to(dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    dout = torch.randn(T, hq, head_dim, device="cuda", generator=g).to(dtype)
    want = _run(_backend_fn("naive", pack, topk), q, k, v, dout)
    got = _run(_backend_fn("triton", pack, topk), q, k, v, dout)
    _assert_matches(got, want, dtype)


@pytest.mark.parametrize("head_dim,heads", HEAD_DIMS.values(), ids=HEAD_DIMS.keys())
def test_the_gates_bf16_product_picks_what_tf32x3_picks_at_every_head_dim(head_dim, heads):
    """Both score exact products of bf16 values in fp32 (reference centroids); only the order of the sums differs."""
    pack, topk = Pack((3000, 1200), 64), 4
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(pack.tokens, heads[0], head_dim, device="cuda", generator=g).bfloat16()
    k = torch.randn(pack.tokens, heads[1], head_dim, device="cuda", generator=g).bfloat16()
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, torch.device("cuda"))
    picks = []
    for flag in (False, True):
        config = dataclasses.replace(triton_backend.tiles_for(head_dim), gate_in_input_dtype=flag)
        picks.append(triton_backend.make_plan(q, k, layout, topk, 1.0, config=config).sel.long().sort(-1).values)
    same = (picks[0] == picks[1]).all(-1).float().mean().item()
    assert same > 0.999, f"only {same:.5f} of the (token, head) selections agree"


def test_auto_never_picks_a_backend_that_cannot_run_the_head_dim():
    from moba_train.ops.moba import BACKENDS

    assert BACKENDS.resolve("auto", torch.device("cuda"), torch.bfloat16, head_dim=256).name == "triton"
    assert BACKENDS.resolve("auto", torch.device("cuda"), torch.bfloat16, head_dim=512).name != "triton"
    with pytest.raises(RuntimeError, match="takes head_dim <= 256, not 512"):
        BACKENDS.resolve("triton", torch.device("cuda"), torch.bfloat16, head_dim=512)


# Keys and values by TMA copies in dq too (TileConfig.dq_kv_descriptors; the forward's are on by default): the
# loads read past a block's end into the next block's keys (only the tensor's end and the head dim are
# zero-filled), so blocks of 16, 80 and 4096 keys, ragged documents and every head size check that those keys
# get no weight.
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_with_kv_descriptors_matches_naive(case, dtype, monkeypatch):
    monkeypatch.setattr(triton_backend, "CONFIG", dataclasses.replace(triton_backend.tiles_for(HEAD_DIM),
                                                                      fwd_kv_descriptors=True, dq_kv_descriptors=True))
    _check_triton_against_naive(case, dtype)


@pytest.mark.parametrize("head_dim,heads", HEAD_DIMS.values(), ids=HEAD_DIMS.keys())
def test_triton_with_kv_descriptors_runs_every_common_head_dim(head_dim, heads, monkeypatch):
    monkeypatch.setattr(triton_backend, "CONFIG", dataclasses.replace(triton_backend.tiles_for(head_dim),
                                                                      fwd_kv_descriptors=True, dq_kv_descriptors=True))
    _check_head_dim_against_naive(head_dim, heads, torch.bfloat16)
