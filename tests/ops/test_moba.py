"""Every MoBA backend against the naive oracle, SDPA and an independent implementation of the paper."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from moba_train.ops import moba_attn_varlen
from moba_train.ops.moba import BACKENDS, Backend, build_layout, select_blocks
from moba_train.ops.moba import lean
from moba_train.ops.moba.registry import resolve
from tests.moba_reference import moba_reference

pytestmark = pytest.mark.usefixtures("nan_poisoned_allocations")   # tests/ops/conftest.py

FAST_BACKENDS = [name for name, b in BACKENDS.items() if name != "naive" and "cpu" in b.devices and b.missing() is None]

# Tolerances against the naive oracle (both accumulate in fp32; bf16 adds one rounding of the result).
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@dataclass(frozen=True)
class Pack:
    doc_lens: tuple[int, ...]
    block_size: int

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(self.doc_lens).cumsum(0).tolist()], dtype=torch.int32)

    @property
    def tokens(self) -> int:
        return sum(self.doc_lens)

    @property
    def max_blocks(self) -> int:
        return max(-(-n // self.block_size) for n in self.doc_lens)


PACKS = {
    "one-doc-64-bs16": Pack((64,), 16),
    "3docs-ragged-bs16": Pack((37, 113, 150), 16),
    "docs-shorter-than-a-block-bs32": Pack((50, 23, 7, 31), 32),
    "20-tiny-docs-then-long-bs8": Pack((3,) * 20 + (41,), 8),
    "bs1": Pack((20, 13), 1),
    "bs48-not-pow2": Pack((100, 97), 48),
}
HEADS = {"mha-2/2": (2, 2), "gqa2-4/2": (4, 2), "gqa4-4/1": (4, 1), "gqa8-8/1": (8, 1)}
TOPKS = {"top1": 1, "top2": 2, "top3": 3, "top-all": 10_000}


def make_inputs(pack: Pack, hq: int, hkv: int, dtype=torch.float32, head_dim=16, seed=0, separated=False):
    g = torch.Generator().manual_seed(seed)
    T = pack.tokens
    q = torch.randn(T, hq, head_dim, generator=g)
    k = torch.randn(T, hkv, head_dim, generator=g)
    v = torch.randn(T, hkv, head_dim, generator=g)
    if separated:
        # Give every block its own key offset so block scores are far apart: implementations that
        # round scores differently then still agree on the top-k, which makes exact comparison fair.
        start = 0
        for n in pack.doc_lens:
            for b0 in range(0, n, pack.block_size):
                k[start + b0:start + min(n, b0 + pack.block_size)] += 2.0 * torch.randn(hkv, head_dim, generator=g)
            start += n
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def run(backend, pack, q, k, v, topk, grad_out):
    out = moba_attn_varlen(q, k, v, pack.cu_seqlens, max(pack.doc_lens), block_size=pack.block_size,
                           topk=topk, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return [out, *grads]


def assert_close(got, want, names=("out", "dq", "dk", "dv"), **tol):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("topk", TOPKS.values(), ids=TOPKS.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("pack", PACKS.values(), ids=PACKS.keys())
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_naive(backend, pack, heads, topk, dtype):
    q, k, v = make_inputs(pack, *heads, dtype=dtype)
    grad_out = torch.randn_like(q)
    assert_close(run(backend, pack, q, k, v, topk, grad_out), run("naive", pack, q, k, v, topk, grad_out), **TOL[dtype])


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("pack", PACKS.values(), ids=PACKS.keys())
@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_topk_covering_all_blocks_is_full_causal_attention(backend, pack, heads):
    q, k, v = make_inputs(pack, *heads)
    grad_out = torch.randn_like(q)
    got = run(backend, pack, q, k, v, pack.max_blocks, grad_out)

    bounds = pack.cu_seqlens.tolist()
    ref = torch.cat([
        F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                       is_causal=True, enable_gqa=True).transpose(0, 1)
        for a, b in zip(bounds, bounds[1:])])
    want = [ref, *torch.autograd.grad(ref, (q, k, v), grad_out)]
    assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_small_topk_differs_from_full_attention(backend):
    pack = Pack((256,), 16)
    q, k, v = make_inputs(pack, 4, 2)
    sparse = moba_attn_varlen(q, k, v, pack.cu_seqlens, 256, block_size=16, topk=2, backend=backend)
    full = moba_attn_varlen(q, k, v, pack.cu_seqlens, 256, block_size=16, topk=16, backend=backend)
    assert (sparse - full).abs().max() > 1e-2


@pytest.mark.parametrize("topk", [1, 2, 3, 9], ids=lambda t: f"top{t}")
@pytest.mark.parametrize("pack", [PACKS["3docs-ragged-bs16"], PACKS["docs-shorter-than-a-block-bs32"], Pack((45, 30), 7)],
                         ids=["3docs-ragged-bs16", "short-docs-bs32", "bs7"])
@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_agrees_with_independent_paper_implementation(backend, pack, topk):
    """Random packed GQA inputs, fp32: outputs and gradients within 1e-4 of a from-scratch implementation."""
    q, k, v = make_inputs(pack, 4, 2, separated=True, seed=topk)
    grad_out = torch.randn_like(q)
    got = run(backend, pack, q, k, v, topk, grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = moba_reference(q64, k64, v64, pack.cu_seqlens, pack.block_size, topk)
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())]
    assert_close(got, want, atol=1e-4, rtol=0)


def test_routing_picks_the_best_blocks_of_the_own_document_only():
    pack = Pack((70, 5, 90), 8)
    q, k, _ = make_inputs(pack, 4, 2)
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, q.device)
    selected = select_blocks(q, k, layout, topk=4)
    starts = layout.block_start.tolist()
    for t in range(pack.tokens):
        doc_first, own = int(layout.token_doc_first_block[t]), int(layout.token_block[t])
        for h in range(4):
            chosen = [b for b in selected[t, h].tolist() if b >= 0]
            candidates = list(range(doc_first, own))
            assert len(chosen) == min(3, len(candidates)) and set(chosen) <= set(candidates)
            scores = {b: float(q[t, h].double() @ k[starts[b]:starts[b] + 8, h // 2].double().mean(0)) for b in candidates}
            worst_chosen = min((scores[b] for b in chosen), default=float("inf"))
            best_left = max((scores[b] for b in candidates if b not in chosen), default=float("-inf"))
            assert worst_chosen >= best_left - 1e-5


@pytest.mark.parametrize("budget", [64, 1000], ids=lambda b: f"budget{b}")
def test_lean_tiling_is_exact_when_tiles_split_blocks_and_rows(monkeypatch, budget):
    """A tiny score budget forces row-split own-block tiles and many segment chunks."""
    monkeypatch.setattr(lean, "SCORE_BUDGET", budget)
    pack = Pack((37, 113, 150), 16)
    q, k, v = make_inputs(pack, 8, 2)
    grad_out = torch.randn_like(q)
    assert_close(run("lean", pack, q, k, v, 3, grad_out), run("naive", pack, q, k, v, 3, grad_out), **TOL[torch.float32])


def test_output_keeps_input_dtype_and_shape():
    pack = PACKS["3docs-ragged-bs16"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        q, k, v = make_inputs(pack, 4, 2, dtype=dtype)
        out = moba_attn_varlen(q, k, v, pack.cu_seqlens, 150, block_size=16, topk=2)
        assert out.dtype == dtype and out.shape == q.shape


def _valid_args():
    pack = PACKS["3docs-ragged-bs16"]
    q, k, v = make_inputs(pack, 4, 2)
    return dict(q=q, k=k, v=v, cu_seqlens=pack.cu_seqlens, max_seqlen=150, block_size=16, topk=2)


BAD_INPUTS = {
    "q-2d": (lambda a: a.update(q=a["q"][:, 0]), "q must be a 3-D tensor"),
    "int-dtype": (lambda a: a.update(q=a["q"].long()), "q must be float16"),
    "mixed-dtypes": (lambda a: a.update(k=a["k"].double()), "share one dtype"),
    "hq-not-multiple-of-hkv": (lambda a: a.update(k=a["k"].repeat(1, 2, 1)[:, :3], v=a["v"].repeat(1, 2, 1)[:, :3]),
                               "multiple of key/value heads"),
    "k-v-shapes-differ": (lambda a: a.update(v=a["v"][:, :1]), "same shape"),
    "token-count-mismatch": (lambda a: a.update(k=a["k"][:-1], v=a["v"][:-1]), "does not match q"),
    "cu-int64": (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), "int32"),
    "cu-not-increasing": (lambda a: a.update(cu_seqlens=torch.tensor([0, 150, 150, 300], dtype=torch.int32)),
                          "strictly increasing"),
    "cu-not-ending-at-T": (lambda a: a.update(cu_seqlens=torch.tensor([0, 37, 150, 299], dtype=torch.int32)),
                           "end at the number of tokens"),
    "cu-not-starting-at-0": (lambda a: a.update(cu_seqlens=torch.tensor([1, 37, 150, 300], dtype=torch.int32)),
                             "start at 0"),
    "max-seqlen-too-small": (lambda a: a.update(max_seqlen=100), "max_seqlen=100 is smaller"),
    "block-size-0": (lambda a: a.update(block_size=0), "block_size must be an int >= 1"),
    "topk-0": (lambda a: a.update(topk=0), "topk must be an int >= 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_value_error_naming_the_problem(case):
    mutate, message = case
    args = _valid_args()
    mutate(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        moba_attn_varlen(q, k, v, args.pop("cu_seqlens"), args.pop("max_seqlen"), **args)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="unknown MoBA backend 'fastest'.*lean"):
        moba_attn_varlen(**_valid_args(), backend="fastest")


def test_backend_that_cannot_run_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(BACKENDS, "needs-x", Backend("needs-x", lambda *a, **k: None, ("cpu",), auto_rank=99,
                                                     missing=lambda: "package x is not installed: pip install x"))
    with pytest.raises(RuntimeError, match="pip install x"):
        moba_attn_varlen(**_valid_args(), backend="needs-x")
    # and auto never picks it, however high its rank
    assert resolve("auto", torch.device("cpu")).name == "lean"


def test_backend_for_another_device_is_refused(monkeypatch):
    monkeypatch.setitem(BACKENDS, "gpu-only", Backend("gpu-only", lambda *a, **k: None, ("cuda",), auto_rank=99))
    with pytest.raises(RuntimeError, match="runs on cuda, not cpu"):
        moba_attn_varlen(**_valid_args(), backend="gpu-only")


def test_auto_names_its_choice_in_the_debug_log(caplog):
    with caplog.at_level(logging.DEBUG, logger="moba_train.ops.moba.registry"):
        moba_attn_varlen(**_valid_args())
    assert "picked 'lean' on cpu" in caplog.text


def test_auto_skips_a_backend_that_does_not_take_the_dtype_and_naming_it_says_which_do(monkeypatch):
    monkeypatch.setitem(BACKENDS, "half-only", Backend("half-only", lambda *a, **k: None, ("cpu",), auto_rank=99,
                                                       dtypes=(torch.float16,)))
    assert resolve("auto", torch.device("cpu"), torch.float32).name == "lean"
    assert resolve("auto", torch.device("cpu"), torch.float16).name == "half-only"
    with pytest.raises(RuntimeError, match=r"takes \['torch.float16'\], not torch.float32; use one of .*'lean'"):
        moba_attn_varlen(**_valid_args(), backend="half-only")


def test_boundaries_are_read_once_per_tensor_and_an_in_place_change_is_seen():
    """Layers share one cu_seqlens tensor: its host copy and block layout are cached on it, keyed by its
    version counter, so an in-place edit can never serve stale boundaries."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    first = moba_attn_varlen(q, k, v, cu, 23, block_size=4, topk=2, backend="lean")
    cached = cu._moba_host_cu
    assert cached[1] == [0, 17, 40]
    again = moba_attn_varlen(q, k, v, cu, 23, block_size=4, topk=2, backend="lean")
    assert cu._moba_host_cu is cached and torch.equal(first, again)
    cu[1] = 25                                             # in place: the version counter moves
    moved = moba_attn_varlen(q, k, v, cu, 25, block_size=4, topk=2, backend="lean")
    fresh = moba_attn_varlen(q, k, v, torch.tensor([0, 25, 40], dtype=torch.int32), 25, block_size=4, topk=2,
                             backend="lean")
    assert cu._moba_host_cu[1] == [0, 25, 40]
    torch.testing.assert_close(moved, fresh, atol=0, rtol=0)


def test_allocations_are_poisoned_in_these_tests():
    """The fixture is on (tests/ops/conftest.py): a fresh torch.empty is NaN, a fresh index the largest int."""
    assert torch.isnan(torch.empty(4)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
    assert (torch.empty(3, dtype=torch.int64) == torch.iinfo(torch.int64).max).all()
