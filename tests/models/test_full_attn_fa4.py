"""The `fa4` full-attention backend (FlashAttention-4, `flash_attn.cute`): its call, its refusals, and `auto`.

FA4 runs only on Hopper and Blackwell GPUs, so on CPU the kernel is swapped for a stand-in with FA4's own
signature (keywords as in flash_attn/cute/interface.py) and its input contract (16-bit, int32 contiguous
boundaries, varlen shapes, heads divisible), computing plain per-document attention that honours `causal` and
`softmax_scale` as FA4 does. What the backend adds, the arguments it passes and how it reads the result, is
then checked against the fp64 reference of test_full_attn.py, outputs and gradients. The GPU test runs the
real kernel.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from moba_train.ops import full_attn
from moba_train.ops.full_attn import FA4_HEAD_DIMS, FULL_ATTN_BACKENDS, full_attn_varlen, resolve
from moba_train.ops.moba import flash as moba_flash
from moba_train.ops.moba.registry import module_installed
from tests.models.test_full_attn import HEADS, PACKS, make, reference

D = FA4_HEAD_DIMS[0]


def fa4_standin(returns_tuple: bool):
    """flash_attn.cute.flash_attn_varlen_func as the 4.0 betas declare it; returns (out, lse) like them, or out
    alone (`returns_tuple=False`), so that the backend is shown to read either."""
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               seqused_q=None, seqused_k=None, page_table=None, softmax_scale=None, causal=False,
                               window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
                               pack_gqa=None, deterministic=False, score_mod=None, mask_mod=None,
                               block_sparse_tensors=None, cu_total_m_blocks=None, cu_total_n_blocks=None,
                               aux_tensors=None, return_lse=False):
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype, "FA4 takes 16-bit only"
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0
        assert q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu is not None and cu.dtype == torch.int32 and cu.stride(0) == 1
        assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
        lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        assert max_seqlen_q is not None and max_seqlen_q >= max(lens)
        assert max_seqlen_k is not None and max_seqlen_k >= max((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist())
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        bounds = cu_seqlens_q.tolist()
        out = torch.cat([F.scaled_dot_product_attention(*(t[None, a:b].transpose(1, 2).float() for t in (q, k, v)),
                                                        is_causal=causal, scale=scale, enable_gqa=True)[0].transpose(0, 1)
                         for a, b in zip(bounds, bounds[1:])]).to(q.dtype)
        if not returns_tuple:
            return out
        needs_lse = return_lse or q.requires_grad or k.requires_grad or v.requires_grad
        return out, (torch.zeros(q.shape[1], q.shape[0]) if needs_lse else None)
    return flash_attn_varlen_func


@pytest.fixture
def fa4_on_cpu(monkeypatch):
    """The fa4 backend, runnable on CPU with the stand-in for the kernel."""
    def install(returns_tuple: bool = True):
        monkeypatch.setattr(full_attn, "_fa4_varlen", lambda: fa4_standin(returns_tuple))
        monkeypatch.setitem(FULL_ATTN_BACKENDS, "fa4", dataclasses.replace(
            FULL_ATTN_BACKENDS["fa4"], devices=("cpu", "cuda"), missing=lambda: None))
    return install


def relative_errors(out, q, k, v, lens, scale):
    want = reference(q, k, v, lens, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out.double())
    # A one-token document has dq = dk = 0 (one key: the softmax is constant) and the kernel's are rounding noise:
    # below a norm of 1 the error is measured absolutely.
    return {name: ((a.double() - b).norm() / b.norm().clamp_min(1.0)).item()
            for name, a, b in zip(["out", "dq", "dk", "dv"], (out, *got), (want, *expected))}


@pytest.mark.parametrize("returns", [True, False], ids=["returns-out-lse", "returns-out"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("lens", PACKS.values(), ids=PACKS.keys())
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale-0.3"])
def test_fa4_call_matches_reference_outputs_and_grads(fa4_on_cpu, lens, heads, scale, returns):
    """Causal, per document, the scale passed on, GQA without repeating KV: a backend that dropped `causal`,
    the boundaries or the scale would differ from the reference by far more than bf16's rounding."""
    fa4_on_cpu(returns)
    q, k, v, cu = make(lens, *heads, dtype=torch.bfloat16, d=D)
    out = full_attn_varlen(q, k, v, cu, max(lens), softmax_scale=scale, backend="fa4")
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    errors = relative_errors(out, q, k, v, lens, scale if scale is not None else D ** -0.5)
    assert all(e < 1e-2 for e in errors.values()), errors


def test_fa4_refuses_head_sizes_it_was_not_measured_with(fa4_on_cpu):
    fa4_on_cpu()
    q, k, v, cu = make((8,), 2, 2, dtype=torch.bfloat16, d=64)
    with pytest.raises(RuntimeError, match=r"full-attention backend 'fa4' takes head_dim in \(128,\), not 64; "
                                           r"use one of \[.*'sdpa'.*\] or backend='auto'"):
        full_attn_varlen(q, k, v, cu, 8, backend="fa4")


def test_fa4_refuses_fp32_naming_the_dtypes_it_takes(fa4_on_cpu):
    fa4_on_cpu()
    q, k, v, cu = make((8,), 2, 2, dtype=torch.float32, d=D)
    with pytest.raises(RuntimeError, match=r"'fa4' takes \['torch.float16', 'torch.bfloat16'\], not torch.float32"):
        full_attn_varlen(q, k, v, cu, 8, backend="fa4")


@pytest.mark.parametrize("head_dim,dtype,picked", [(D, torch.bfloat16, True), (D, torch.float16, True),
                                                    (64, torch.bfloat16, False), (D, torch.float32, False)],
                         ids=["d128-bf16", "d128-fp16", "d64-bf16", "d128-fp32"])
def test_auto_picks_fa4_where_it_can_run_and_only_there(monkeypatch, head_dim, dtype, picked):
    """On a Hopper GPU with flash-attn 2 and FA4 both installed (every backend made available here)."""
    for name in ("fa4", "flash", "varlen"):
        monkeypatch.setitem(FULL_ATTN_BACKENDS, name, dataclasses.replace(FULL_ATTN_BACKENDS[name], missing=lambda: None))
    name = resolve("auto", torch.device("cuda"), dtype, head_dim=head_dim).name
    assert (name == "fa4") == picked, name


def test_auto_takes_fa4_for_long_documents_too(fa4_on_cpu, monkeypatch):
    """The per-pack switch to sdpa for long documents is for torch's varlen kernel; FA4 beats cuDNN there."""
    calls = []
    fa4_on_cpu()
    real = FULL_ATTN_BACKENDS["fa4"]
    monkeypatch.setitem(FULL_ATTN_BACKENDS, "fa4",
                        dataclasses.replace(real, fn=lambda *a: calls.append("fa4") or real.fn(*a)))
    lens = (9000,)
    q = torch.zeros(sum(lens), 1, D, dtype=torch.bfloat16)
    cu = torch.tensor([0, *lens], dtype=torch.int32)
    full_attn_varlen(q, q, q, cu, max(lens))
    assert calls == ["fa4"]


# --------------------------------------------------------------------------- unavailable, refused


@pytest.mark.parametrize("installed,cuda,capability,expected", [
    (False, True, (9, 0), "FlashAttention-4 is not installed; install it with `pip install 'moba-train[fa4]'`"),
    (True, False, None, "no CUDA device: FlashAttention-4 runs on NVIDIA Hopper and Blackwell GPUs"),
    (True, True, (8, 0), "runs on Hopper and Blackwell GPUs (compute capability 9.x to 11.x), not 8.0; use backend "
                         "'varlen' or 'sdpa'"),
    (True, True, (9, 0), None), (True, True, (10, 0), None),
], ids=["not-installed", "no-cuda", "ampere", "hopper", "blackwell"])
def test_fa4_says_why_it_cannot_run(monkeypatch, installed, cuda, capability, expected):
    monkeypatch.setattr(full_attn, "module_installed", lambda name: installed and name == "flash_attn.cute")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    reason = full_attn._fa4_missing()
    assert reason == expected if expected is None else expected in reason


def test_asking_for_fa4_by_name_without_it_names_the_install_command(monkeypatch):
    monkeypatch.setattr(full_attn, "module_installed", lambda name: False)
    q, k, v, cu = make((8,), 2, 2, dtype=torch.bfloat16, d=D)
    with pytest.raises(RuntimeError, match=r"full-attention backend 'fa4' is unavailable: FlashAttention-4 is not "
                                           r"installed; install it with `pip install 'moba-train\[fa4\]'`"):
        full_attn_varlen(q, k, v, cu, 8, backend="fa4")


@pytest.fixture
def fa4_alone(tmp_path, monkeypatch):
    """A site where only FlashAttention-4 is installed: flash-attn-4's wheel ships the package `flash_attn.cute`
    and no flash_attn/__init__.py, so `flash_attn` is a namespace package without flash-attn 2 in it."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


def test_fa4_alone_is_not_taken_for_flash_attn_2(fa4_alone):
    """Else `auto` would pick the flash backends (flash-attn 2) and fail importing them at the first step."""
    assert module_installed("flash_attn.cute")
    assert not module_installed("flash_attn.flash_attn_interface")
    assert "flash-attn is not installed" in full_attn._flash_missing()
    assert "flash-attn is not installed" in moba_flash.missing()


def test_module_installed_is_false_when_the_parent_package_is_missing():
    assert not module_installed("no_such_package_moba_train.sub")


@pytest.mark.gpu
@pytest.mark.skipif(full_attn._fa4_missing() is not None, reason="FlashAttention-4 cannot run here")
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("lens", [(33,), (5, 17, 9), (1, 1, 2, 1, 20), (700, 1, 3000, 130)],
                         ids=["one-doc-33", "3-docs", "tiny-docs-then-long", "long-docs"])
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale-0.3"])
def test_fa4_on_gpu_matches_reference_outputs_and_grads(lens, heads, scale):
    q, k, v, cu = make(lens, *heads, dtype=torch.bfloat16, d=D)
    q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    out = full_attn_varlen(q, k, v, cu.cuda(), max(lens), softmax_scale=scale, backend="fa4")
    errors = relative_errors(out, q, k, v, lens, scale if scale is not None else D ** -0.5)
    assert all(e < 1e-2 for e in errors.values()), errors
