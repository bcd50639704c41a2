"""The `flash` MoBA backend, on CPU, against a PyTorch stand-in for flash-attn's two varlen internals.

flash-attn cannot be installed on the test machines (it needs CUDA to build and run). What flash.py
adds on top of it is orchestration: block sequences, (block, KV head) pair sequences, the
log-sum-exp merge, and a backward that hands flash-attn the *merged* output and lse. So these tests
swap `_flash_attn_varlen_forward` / `_flash_attn_varlen_backward` for plain fp32 attention with the
same signatures, return layouts and backward formulas (FA2's: P from the lse it is given, D = rowsum(dO * O)),
once for the 2.6 API and once for the 2.7+ one (a torch custom op, as there), and compare the
backend to the naive oracle. The stand-in is itself checked against torch SDPA, so a wrong stand-in
cannot make the comparison pass.
"""

import dataclasses
import functools
import importlib.util
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from moba_train.ops import moba_attn_varlen
from moba_train.ops.moba import BACKENDS, flash
from moba_train.ops.moba.registry import module_installed, resolve
from tests.ops.test_moba import TOL, Pack, assert_close, make_inputs, run

# --------------------------------------------------------------------------- the stand-in


def _spans(cu: torch.Tensor):
    bounds = cu.tolist()
    return list(zip(bounds, bounds[1:]))


def _check_call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softcap, alibi_slopes):
    """What flash-attn itself insists on, plus: every optional feature off and max_seqlen large enough."""
    assert q.dtype == k.dtype == v.dtype and q.dim() == k.dim() == 3 and q.shape[1] % k.shape[1] == 0
    assert q.shape[-1] % 8 == 0, "flash-attn's internals take head_dim % 8 == 0"
    assert all(t.stride(-1) == 1 for t in (q, k, v))
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.numel() == cu_k.numel()
    assert cu_q[-1] == q.shape[0] and cu_k[-1] == k.shape[0]
    assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    assert int((cu_q[1:] - cu_q[:-1]).min()) > 0, "an empty query sequence makes flash-attn's gradients NaN"
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None


def _scores(q, k, scale, causal):
    """Scaled fp32 scores [H, Lq, Lk] of one sequence, KV heads shared by groups of query heads;
    causal is aligned to the bottom-right corner, as in flash-attn 2.1+."""
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(g, dim=1)) * scale
    if causal:
        Lq, Lk = q.shape[0], k.shape[0]
        allowed = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def reference_forward(q, k, v, cu_q, cu_k, scale, causal):
    """Plain varlen attention: out [Nq, H, D] in q's dtype and lse [H, Nq] fp32 (flash-attn's layout)."""
    g = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for (a, b), (c, d) in zip(_spans(cu_q), _spans(cu_k)):
        s = _scores(q[a:b], k[c:d], scale, causal)
        lse[:, a:b] = s.logsumexp(-1)
        out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[c:d].float().repeat_interleave(g, dim=1)).to(q.dtype)
    return out, lse


def reference_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal):
    """FA2's backward from the GIVEN out and lse, written into dq, dk, dv."""
    Hk, g = k.shape[1], q.shape[1] // k.shape[1]
    for (a, b), (c, d) in zip(_spans(cu_q), _spans(cu_k)):
        p = torch.exp(_scores(q[a:b], k[c:d], scale, causal) - lse[:, a:b, None])    # [H, Lq, Lk]
        do, o, qq = (t[a:b].float().transpose(0, 1) for t in (dout, out, q))         # [H, Lq, D]
        kk, vv = (t[c:d].float().repeat_interleave(g, dim=1).transpose(0, 1) for t in (k, v))
        dv_h = p.transpose(1, 2) @ do
        ds = p * (do @ vv.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[a:b] = (ds @ kk * scale).transpose(0, 1).to(dq.dtype)
        dk_h = ds.transpose(1, 2) @ qq * scale
        # the query heads of a group share one KV head: their dk, dv add up
        dk[c:d] = dk_h.view(Hk, g, d - c, -1).sum(1).transpose(0, 1).to(dk.dtype)
        dv[c:d] = dv_h.view(Hk, g, d - c, -1).sum(1).transpose(0, 1).to(dv.dtype)


# flash-attn 2.6.x: window_size tuple; forward returns (out, q, k, v, out_padded, lse, S_dmask, rng_state),
# backward (dq, dk, dv, softmax_d) after writing into the dq, dk, dv given.
def fa26_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                        causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_softmax=False,
                        block_table=None, leftpad_k=None, seqused_k=None):
    _check_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softcap, alibi_slopes)
    assert tuple(window_size) == (-1, -1) and not return_softmax and block_table is None
    out, lse = reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, q, k, v, out, lse, None, None


def fa26_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                         deterministic, rng_state=None):
    _check_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softcap, alibi_slopes)
    assert tuple(window_size) == (-1, -1) and dq is not None and dk is not None and dv is not None
    assert softmax_lse.dtype == torch.float32 and softmax_lse.shape == (q.shape[1], q.shape[0])
    assert softmax_lse.is_contiguous() and out.shape == dout.shape == q.shape
    reference_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return dq, dk, dv, torch.zeros(q.shape[1], q.shape[0])


# flash-attn 2.7+: window_size_left/right, torch.library custom ops (whose __call__ hides the signature);
# forward returns (out_padded, lse, S_dmask, rng_state), backward mutates dq, dk, dv and returns softmax_d.
@torch.library.custom_op("moba_flash_test::fa27_varlen_forward", mutates_args=(), device_types="cpu")
def fa27_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                        softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
                        softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                        return_softmax: bool = False, block_table: Optional[torch.Tensor] = None,
                        leftpad_k: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None,
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softcap, alibi_slopes)
    assert window_size_left == window_size_right == -1 and not return_softmax and block_table is None
    out, lse = reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("moba_flash_test::fa27_varlen_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
def fa27_varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
                         dv: Optional[torch.Tensor], cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
                         window_size_left: int, window_size_right: int, softcap: float,
                         alibi_slopes: Optional[torch.Tensor], deterministic: bool,
                         rng_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softcap, alibi_slopes)
    assert window_size_left == window_size_right == -1 and dq is not None and dk is not None and dv is not None
    assert softmax_lse.dtype == torch.float32 and softmax_lse.shape == (q.shape[1], q.shape[0])
    assert softmax_lse.is_contiguous() and out.shape == dout.shape == q.shape
    reference_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return torch.zeros(q.shape[1], q.shape[0])


STANDINS = {"fa2.6": (fa26_varlen_forward, fa26_varlen_backward),
            "fa2.7+": (fa27_varlen_forward, fa27_varlen_backward)}


@pytest.fixture
def standin(monkeypatch):
    """install(api): route flash.py to the stand-in and let the backend run on CPU in any float dtype."""
    def install(api="fa2.7+", functions=None):
        pair = functions or STANDINS[api]
        monkeypatch.setattr(flash, "_load_flash_attn", lambda: pair)
        monkeypatch.setattr(flash, "REQUIRE_CUDA", False)
        monkeypatch.setitem(BACKENDS, "flash", dataclasses.replace(
            BACKENDS["flash"], devices=("cpu",), dtypes=(torch.float32, torch.bfloat16)))
    return install


# --------------------------------------------------------------------------- the stand-in is right


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("api", STANDINS)
def test_standin_matches_sdpa(api, causal):
    """Forward out and lse, and backward from them, against SDPA and its autograd: 2 sequences, GQA 2."""
    fwd, bwd = STANDINS[api]
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k = ((7, 12), (7, 12)) if causal else ((5, 9), (8, 3))   # non-causal: Lq != Lk, as for the pairs
    q = torch.randn(sum(lens_q), 4, 8, generator=g)
    k, v = (torch.randn(sum(lens_k), 2, 8, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    cu_q, cu_k = (torch.tensor([0, a, a + b], dtype=torch.int32) for a, b in (lens_q, lens_k))
    scale = 0.3
    res = fwd(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
              dropout_p=0.0, softmax_scale=scale, causal=causal)
    out, lse = (res[0], res[5]) if api == "fa2.6" else (res[0], res[1])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    window = dict(window_size=(-1, -1)) if api == "fa2.6" else dict(window_size_left=-1, window_size_right=-1)
    bwd(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), dropout_p=0.0, softmax_scale=scale, causal=causal,
        softcap=0.0, alibi_slopes=None, deterministic=False, **window)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    want_out, want_lse = [], []
    for (a, b), (c, d) in zip(_spans(cu_q), _spans(cu_k)):
        qs, ks, vs = (t.transpose(0, 1) for t in (qr[a:b], kr[c:d], vr[c:d]))
        want_out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale,
                                                       enable_gqa=True).transpose(0, 1))
        scores = (qs @ ks.repeat_interleave(2, dim=0).transpose(1, 2)).detach() * scale
        if causal:
            scores = scores.masked_fill(torch.ones(b - a, d - c, dtype=torch.bool).triu(1), float("-inf"))
        want_lse.append(scores.logsumexp(-1))
    want_out = torch.cat(want_out)
    want = [want_out, torch.cat(want_lse, dim=1), *torch.autograd.grad(want_out, (qr, kr, vr), dout)]
    assert_close([out, lse, dq, dk, dv], want, names=("out", "lse", "dq", "dk", "dv"), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the backend against naive

PACKS = {
    "3docs-ragged-bs16": Pack((37, 70, 45), 16),
    "docs-shorter-than-a-block-bs32": Pack((50, 23, 7, 31), 32),
    "bs7-not-pow2": Pack((45, 30), 7),
}
HEADS = {"mha-2/2": (2, 2), "gqa2-4/2": (4, 2), "gqa4-4/1": (4, 1)}
TOPKS = {"top1": 1, "top2": 2, "top3": 3, "top-beyond-blocks": 100}


# Every pack through the 2.7+ API; the 2.6 API (other argument names and return tuple) on one pack.
CASES = [pytest.param(pack, heads, topk, api, id=f"{pack_id}-{heads_id}-{topk_id}-{api}")
         for api, packs in (("fa2.7+", PACKS), ("fa2.6", ["3docs-ragged-bs16"]))
         for pack_id, pack in PACKS.items() if pack_id in packs
         for heads_id, heads in HEADS.items()
         for topk_id, topk in TOPKS.items()]


@pytest.mark.parametrize("pack, heads, topk, api", CASES)
def test_flash_matches_naive(standin, pack, heads, topk, api):
    standin(api)
    q, k, v = make_inputs(pack, *heads)
    grad_out = torch.randn_like(q)
    assert_close(run("flash", pack, q, k, v, topk, grad_out), run("naive", pack, q, k, v, topk, grad_out),
                 **TOL[torch.float32])


@pytest.mark.parametrize("case", [dict(dtype=torch.bfloat16), dict(head_dim=12)], ids=["bf16", "head-dim-12-padded"])
def test_flash_matches_naive_in_bf16_and_with_a_head_dim_flash_attn_must_pad(standin, case):
    standin()
    pack = PACKS["3docs-ragged-bs16"]
    q, k, v = make_inputs(pack, 4, 2, **case)
    grad_out = torch.randn_like(q)
    assert_close(run("flash", pack, q, k, v, 3, grad_out), run("naive", pack, q, k, v, 3, grad_out),
                 **TOL[case.get("dtype", torch.float32)])


def test_topk_beyond_the_block_count_is_full_causal_attention(standin):
    standin()
    pack = PACKS["3docs-ragged-bs16"]
    q, k, v = make_inputs(pack, 4, 2)
    grad_out = torch.randn_like(q)
    got = run("flash", pack, q, k, v, 100, grad_out)
    bounds = pack.cu_seqlens.tolist()
    ref = torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                    v[a:b].transpose(0, 1), is_causal=True,
                                                    enable_gqa=True).transpose(0, 1)
                     for a, b in zip(bounds, bounds[1:])])
    assert_close(got, [ref, *torch.autograd.grad(ref, (q, k, v), grad_out)], atol=2e-5, rtol=1e-4)


def test_two_varlen_calls_each_way_and_kv_never_repeated_per_query_head(standin):
    """Forward: one causal call with K/V at Hkv heads, one non-causal call over 1-head pairs; same backward."""
    calls = []

    def recorded(fn, kind):
        @functools.wraps(fn)   # keeps the signature visible to the adapter
        def wrapper(**kw):
            calls.append((kind, kw["causal"], kw["k"].shape[1], kw["cu_seqlens_k"].numel() - 1))
            return fn(**kw)
        return wrapper

    standin(functions=(recorded(fa26_varlen_forward, "fwd"), recorded(fa26_varlen_backward, "bwd")))
    pack = PACKS["3docs-ragged-bs16"]                      # 3 + 5 + 3 = 11 blocks
    q, k, v = make_inputs(pack, 4, 2)
    run("flash", pack, q, k, v, 3, torch.randn_like(q))
    assert [c[:3] for c in calls] == [("fwd", True, 2), ("fwd", False, 1), ("bwd", True, 2), ("bwd", False, 1)]
    assert calls[0][3] == 11                               # own part: one sequence per block
    assert calls[1][3] <= (11 - 3) * 2                     # pairs: at most one per (earlier block, KV head)

    calls.clear()
    run("flash", pack, q, k, v, 1, torch.randn_like(q))    # topk=1: own blocks only
    assert [c[:2] for c in calls] == [("fwd", True), ("bwd", True)]


# --------------------------------------------------------------------------- unavailable, refused


@pytest.mark.skipif(module_installed("flash_attn.flash_attn_interface"), reason="flash-attn is installed here")
def test_without_flash_attn_the_backend_names_the_install_command():
    pack = PACKS["3docs-ragged-bs16"]
    q, k, v = make_inputs(pack, 4, 2)
    with pytest.raises(RuntimeError, match=r"backend 'flash' is unavailable: flash-attn is not installed: "
                                           r"pip install 'moba-train\[flash\]' on a CUDA machine, or use backend='triton'"):
        moba_attn_varlen(q, k, v, pack.cu_seqlens, 70, block_size=16, topk=2, backend="flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_backend_says_so_even_when_flash_attn_imports(monkeypatch):
    monkeypatch.setattr(flash, "_load_flash_attn", lambda: STANDINS["fa2.7+"])
    assert "no CUDA device" in flash.missing()
    pack = PACKS["3docs-ragged-bs16"]
    q, k, v = make_inputs(pack, 4, 2)
    with pytest.raises(RuntimeError, match="backend 'flash' is unavailable: no CUDA device"):
        moba_attn_varlen(q, k, v, pack.cu_seqlens, 70, block_size=16, topk=2, backend="flash")


def test_auto_never_picks_flash(standin):
    standin()
    assert BACKENDS["flash"].auto_rank is None
    assert resolve("auto", torch.device("cpu"), torch.float32).name == "lean"


def test_a_flash_attn_signature_it_does_not_know_is_refused_naming_the_supported_versions(standin):
    def fa25_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                            softmax_scale, causal, window_size, alibi_slopes, return_softmax, block_table):
        raise AssertionError("must not be called")        # 2.5: no softcap yet

    standin(functions=(fa25_varlen_forward, fa26_varlen_backward))
    pack = PACKS["3docs-ragged-bs16"]
    q, k, v = make_inputs(pack, 4, 2)
    with pytest.raises(RuntimeError, match=r"does not know the signature of flash-attn .*fa25_varlen_forward\(q, k, v, "
                                           r".*supports flash-attn 2\.6\.x .* and 2\.7\.x-2\.8\.x"):
        moba_attn_varlen(q, k, v, pack.cu_seqlens, 70, block_size=16, topk=2, backend="flash")
