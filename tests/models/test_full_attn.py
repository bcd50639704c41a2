"""full_attn_varlen against a plain per-document softmax reference: outputs and gradients."""

from __future__ import annotations

import logging

import pytest
import torch

from moba_train.ops import moba_attn_varlen
from moba_train.ops.full_attn import full_attn_varlen
from moba_train.ops.moba.registry import module_installed

PACKS = {"one-doc-33": (33,), "3-docs": (5, 17, 9), "tiny-docs-then-long": (1, 1, 2, 1, 20), "doc-of-1": (1,)}
HEADS = {"mha-2/2": (2, 2), "gqa2-4/2": (4, 2), "gqa3-6/2": (6, 2), "gqa8-8/1": (8, 1)}


def reference(q, k, v, lens, scale):
    """Causal softmax attention one document and one head at a time, in fp64, KV heads indexed by h // group."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lens:
        heads = []
        for h in range(q.shape[1]):
            qh, kh, vh = (t[start:start + n, i].double() for t, i in ((q, h), (k, h // group), (v, h // group)))
            scores = (qh @ kh.T) * scale
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ vh)
        out.append(torch.stack(heads, 1))
        start += n
    return torch.cat(out)


def make(lens, hq, hkv, dtype=torch.float32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("lens", PACKS.values(), ids=PACKS.keys())
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale-0.3"])
def test_sdpa_matches_reference_outputs_and_grads(lens, heads, scale):
    q, k, v, cu = make(lens, *heads)
    out = full_attn_varlen(q, k, v, cu, max(lens), softmax_scale=scale, backend="sdpa")
    want = reference(q, k, v, lens, scale if scale is not None else q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out.double())
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_bf16_close_to_fp32_reference():
    lens = (9, 24)
    q, k, v, cu = make(lens, 4, 2, dtype=torch.bfloat16)
    out = full_attn_varlen(q, k, v, cu, 24)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, lens, 0.25), atol=3e-2, rtol=3e-2)


def test_equals_moba_when_topk_covers_every_block():
    lens = (37, 50, 7)
    q, k, v, cu = make(lens, 4, 2)
    full = full_attn_varlen(q, k, v, cu, 50)
    moba = moba_attn_varlen(q, k, v, cu, 50, block_size=8, topk=100)
    torch.testing.assert_close(full, moba, atol=2e-6, rtol=1e-5)


def test_documents_do_not_see_each_other():
    lens = (10, 12)
    q, k, v, cu = make(lens, 2, 2)
    before = full_attn_varlen(q, k, v, cu, 12).detach()
    with torch.no_grad():
        k[:10] += 5.0
        v[:10] -= 3.0
    after = full_attn_varlen(q, k, v, cu, 12).detach()
    torch.testing.assert_close(after[10:], before[10:], atol=0, rtol=0)
    assert not torch.allclose(after[:10], before[:10])


def test_auto_picks_sdpa_on_cpu_and_logs_it(caplog):
    q, k, v, cu = make((8,), 2, 2)
    with caplog.at_level(logging.DEBUG, logger="moba_train.ops.full_attn"):
        auto = full_attn_varlen(q, k, v, cu, 8)
    assert "picked 'sdpa'" in caplog.text
    torch.testing.assert_close(auto, full_attn_varlen(q, k, v, cu, 8, backend="sdpa"), atol=0, rtol=0)


def test_unknown_backend_lists_the_choices():
    q, k, v, cu = make((8,), 2, 2)
    with pytest.raises(ValueError, match=r"unknown full-attention backend 'nope'; choose one of \['auto', 'fa4', 'flash', 'sdpa', 'varlen'\]"):
        full_attn_varlen(q, k, v, cu, 8, backend="nope")


@pytest.mark.skipif(module_installed("flash_attn.flash_attn_interface"), reason="flash-attn is installed here")
def test_flash_without_flash_attn_names_the_install_command():
    q, k, v, cu = make((8,), 2, 2)
    with pytest.raises(RuntimeError, match=r"pip install moba-train\[flash\]"):
        full_attn_varlen(q, k, v, cu, 8, backend="flash")


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v, cu: (q, k, v, cu.long()), "cu_seqlens must be a 1-D int32 tensor"),
    (lambda q, k, v, cu: (q, k, v, cu[:-1]), "cu_seqlens must end at the number of tokens"),
    (lambda q, k, v, cu: (q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu), "multiple of key/value heads"),
    (lambda q, k, v, cu: (q[None], k, v, cu), "must be a 3-D tensor"),
], ids=["int64-cu", "short-cu", "heads-not-multiple", "4d-q"])
def test_input_checks(mutate, message):
    q, k, v, cu = mutate(*make((5, 7), 4, 2))
    with pytest.raises(ValueError, match=message):
        full_attn_varlen(q, k, v, cu, 7)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("lens", [(33,), (5, 17, 9), (1, 1, 2, 1, 20), (700, 1, 3000, 130)],
                         ids=["one-doc-33", "3-docs", "tiny-docs-then-long", "long-docs"])
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale-0.3"])
def test_varlen_on_gpu_matches_reference_outputs_and_grads(lens, heads, scale):
    """bf16 kernels against the fp64 reference, by relative error over the whole tensor: elementwise bounds
    fail on long documents, whose gradients sum thousands of bf16 products (and, without GQA in this torch's
    kernel, 8 repeated heads)."""
    q, k, v, cu = make(lens, *heads, dtype=torch.bfloat16, d=64)
    q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    out = full_attn_varlen(q, k, v, cu.cuda(), max(lens), softmax_scale=scale, backend="varlen")
    want = reference(q, k, v, lens, scale if scale is not None else 64 ** -0.5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out.double())
    for name, a, b in zip(["out", "dq", "dk", "dv"], (out, *got), (want, *expected)):
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 1e-2, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
def test_auto_prefers_one_varlen_call_on_gpu_in_16_bit():
    from moba_train.ops.full_attn import resolve
    assert resolve("auto", torch.device("cuda"), torch.bfloat16).name in ("varlen", "flash")
    assert resolve("auto", torch.device("cuda"), torch.float32).name == "sdpa"


def test_varlen_without_cuda_is_unavailable_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    q, k, v, cu = make((8,), 2, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="varlen"):
        full_attn_varlen(q, k, v, cu, 8, backend="varlen")


def _per_doc_sdpa(query, key, value, cu, scale=None, enable_gqa=False):
    assert enable_gqa or query.shape[1] == key.shape[1], "GQA inputs reached a kernel without GQA"
    bounds = cu.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[None, a:b].transpose(1, 2) for t in (query, key, value)), is_causal=True, scale=scale,
        enable_gqa=enable_gqa)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:])])


def varlen_torch_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal
    return _per_doc_sdpa(query, key, value, cu_seq_q)


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    assert window_size == (-1, 0)
    return _per_doc_sdpa(query, key, value, cu_seq_q, scale)


def varlen_torch_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0)
    return _per_doc_sdpa(query, key, value, cu_seq_q, scale, enable_gqa)


@pytest.mark.parametrize("api", [varlen_torch_2_9, varlen_torch_2_11, varlen_torch_2_12],
                         ids=["torch-2.9-api", "torch-2.11-api", "torch-2.12-api"])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["mha", "gqa3"])
def test_varlen_adapts_to_both_torch_signatures(monkeypatch, api, heads):
    """On CPU, with a per-document stand-in for the kernel: the scale and GQA reach it either way."""
    import inspect

    from moba_train.ops import full_attn

    monkeypatch.setattr(full_attn, "_varlen_api", lambda: (api, frozenset(inspect.signature(api).parameters)))
    lens = (5, 17, 9)
    q, k, v, cu = make(lens, *heads)
    out = full_attn._varlen(q, k, v, cu, 17, 0.3)
    torch.testing.assert_close(out.double(), reference(q, k, v, lens, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens,expected", [((40000,), "sdpa"), ((9000, 9000), "sdpa"), ((2048,) * 16, "varlen"),
                                           ((30000, *(10,) * 100), "varlen")],
                         ids=["one-long-doc", "two-long-docs", "16-short-docs", "one-long-many-tiny"])
def test_auto_picks_per_pack_between_sdpa_and_one_varlen_call(monkeypatch, lens, expected):
    """With varlen available (a stand-in here), auto takes it for short documents, sdpa for long ones."""
    from moba_train.ops import full_attn

    used = []
    for name in ("sdpa", "varlen"):
        b = full_attn.FULL_ATTN_BACKENDS[name]
        monkeypatch.setitem(full_attn.FULL_ATTN_BACKENDS, name, type(b)(
            name, lambda q, *a, n=name: used.append(n) or q, devices=("cpu",), auto_rank=b.auto_rank))
    monkeypatch.setitem(full_attn.FULL_ATTN_BACKENDS, "flash", type(b)("flash", None, ("cuda",), None))
    T = sum(lens)
    q = torch.zeros(T, 1, 8)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    full_attn_varlen(q, q, q, cu, max(lens))
    assert used == [expected]
