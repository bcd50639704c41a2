"""The triton backend's kernels under Triton's CPU interpreter (TRITON_INTERPRET=1), so CI without a GPU runs them.

Triton decides at import whether a kernel is compiled or interpreted, and the package imports the
kernels early, so the cases run in a fresh process: the launcher test below starts
`TRITON_INTERPRET=1 pytest <this file>`, where the cases run and the launcher is skipped.
Tiny tiles (16) make every loop take several steps on tiny inputs; fp32 and fp16 (the interpreter's
numpy has no bf16 matmul).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from moba_train.ops.moba import build_layout, select_blocks
from moba_train.ops.moba import triton as triton_backend
from moba_train.ops.moba import triton_routing
from moba_train.ops.moba.naive import moba_naive
from tests.ops.test_moba import Pack, make_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed: pip install 'moba-train[triton]'")


@needs_triton
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="launcher: CPU only, outside the interpreter")
def test_interpreted_kernels_pass_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=540)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    # Every case ran and passed; only the launcher itself is skipped in there.
    expected = 3 * len(CASES) + 3 * len(GATE_CASES) + 3 + len(FP16_OTHER_KV_LOADS) + 2 * len(SPAN_CASES)
    assert res.returncode == 0 and f"{expected} passed, 1 skipped" in summary, res.stdout[-6000:] + res.stderr[-2000:]


CASES = {
    "3docs-ragged-bs16-gqa2-top3": (Pack((37, 113, 150), 16), (4, 2), 3),
    "short-docs-bs32-gqa8-top2": (Pack((50, 23, 7, 31), 32), (8, 1), 2),
    "bs48-mha-top-all": (Pack((100, 97), 48), (2, 2), 10_000),
    "one-doc-top1": (Pack((64,), 16), (4, 1), 1),
    "bs7-gqa3-top3": (Pack((45, 30), 7), (6, 2), 3),
}
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs inside the launcher's TRITON_INTERPRET=1 process")


def _run(pack, heads, topk, dtype, monkeypatch, shared_routing, **config):
    monkeypatch.setattr(triton_backend, "CONFIG", triton_backend.TileConfig(
        route_m=16, route_n=16, pair_m=16, fwd_n=16, own_m=16, dq_n=16, dkv_m=16, dkv_n=16, **config))
    # Separated gates when each backend routes on its own, so rounding cannot flip a near-tie.
    q, k, v = make_inputs(pack, *heads, dtype=dtype, separated=not shared_routing)
    grad_out = torch.randn_like(q)
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, q.device)
    scale = q.shape[-1] ** -0.5
    sel = select_blocks(q, k, layout, topk) if shared_routing else None
    got = triton_backend.moba_triton(q, k, v, layout, topk=topk, softmax_scale=scale, selected=sel)
    want = moba_naive(q, k, v, layout, topk=topk, softmax_scale=scale)
    for name, a, b in zip(("out", "dq", "dk", "dv"), [got, *torch.autograd.grad(got, (q, k, v), grad_out)],
                          [want, *torch.autograd.grad(want, (q, k, v), grad_out)]):
        assert a.dtype == b.dtype == dtype
        tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


@in_interpreter
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_with_its_own_gate_matches_naive_fp32(case, monkeypatch):
    _run(*case, torch.float32, monkeypatch, shared_routing=False)


@in_interpreter
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_with_its_own_gate_matches_naive_fp16(case, monkeypatch):
    """The gate's product in fp16 (the reference convention's exact path), through the whole operator."""
    _run(*case, torch.float16, monkeypatch, shared_routing=False, gate_in_input_dtype=True)


GATE_CASES = ["3docs-ragged-bs16-gqa2-top3", "short-docs-bs32-gqa8-top2", "bs7-gqa3-top3"]


@in_interpreter
@pytest.mark.parametrize("centroids,input_dtype_dot", [("reference", True), ("reference", False), ("fp32", True)],
                         ids=["reference-fp16-product", "reference-tf32x3", "fp32-centroids-tf32x3"])
@pytest.mark.parametrize("name", GATE_CASES)
def test_the_fp16_gate_selects_the_blocks_the_pytorch_gate_selects(name, centroids, input_dtype_dot, monkeypatch):
    """fp16 inputs: the kernel scores by one fp16 product where that is exact (reference centroids) and asked for,
    else by tf32x3; the launches say which ran."""
    pack, heads, topk = CASES[name]
    q, k, _ = make_inputs(pack, *heads, dtype=torch.float16, separated=True)
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, q.device)
    kernel, launched = triton_routing._select_blocks_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["IN_DTYPE_DOT"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_routing, "_select_blocks_kernel", Recorder())
    config = triton_backend.TileConfig(route_m=16, route_n=16, gate_in_input_dtype=input_dtype_dot)
    got = triton_backend.make_plan(q, k, layout, topk, 1.0, config=config, centroids=centroids).sel
    want = select_blocks(q, k, layout, topk, centroids)
    assert launched and set(launched) == {input_dtype_dot and centroids == "reference"}
    assert torch.equal(got.long().sort(-1).values, want.sort(-1).values)


@in_interpreter
@pytest.mark.parametrize("case", [CASES["3docs-ragged-bs16-gqa2-top3"], CASES["bs7-gqa3-top3"]],
                         ids=["3docs-ragged-bs16-gqa2-top3", "bs7-gqa3-top3"])
def test_triton_given_the_same_routing_matches_naive_fp16(case, monkeypatch):
    _run(*case, torch.float16, monkeypatch, shared_routing=True)


# Keys and values: by TMA descriptors in the forward and plain loads in dq by default, the other way round here,
# so each kernel runs both ways. Descriptors take 2-byte elements only (fp32 reads plain: `_kv_sources`), so the
# fp32 cases run plain loads both ways and the fp16 ones the descriptors. A descriptor tile may read past its
# block's end (bs7, bs48: blocks that are not a multiple of the 16-key tile) and past the pack's end.
OTHER_KV_LOADS = dict(fwd_kv_descriptors=False, dq_kv_descriptors=True)


@in_interpreter
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_with_the_other_kv_loads_matches_naive_fp32(case, monkeypatch):
    _run(*case, torch.float32, monkeypatch, shared_routing=False, **OTHER_KV_LOADS)


FP16_OTHER_KV_LOADS = ["bs7-gqa3-top3", "bs48-mha-top-all"]


@in_interpreter
@pytest.mark.parametrize("name", FP16_OTHER_KV_LOADS)
def test_triton_with_the_other_kv_loads_matches_naive_fp16(name, monkeypatch):
    _run(*CASES[name], torch.float16, monkeypatch, shared_routing=True, **OTHER_KV_LOADS)


@in_interpreter
def test_triton_with_the_other_kv_loads_in_spans_matches_naive_fp16(monkeypatch):
    name = "3docs-ragged-bs16-gqa2-top3"
    _run(*CASES[name], torch.float16, monkeypatch, shared_routing=True, row_state_bytes=_state_bytes(name, 20),
         **OTHER_KV_LOADS)


# The forward in spans of whole blocks: a budget of 20 tokens' fp32 row state makes several spans per pack (and
# blocks larger than the budget spans of their own).
SPAN_CASES = ["3docs-ragged-bs16-gqa2-top3", "bs48-mha-top-all", "bs7-gqa3-top3"]


def _state_bytes(name, tokens, head_dim=16):      # make_inputs' head_dim
    return tokens * CASES[name][1][0] * (head_dim + 2) * 4


@in_interpreter
@pytest.mark.parametrize("name", SPAN_CASES)
def test_triton_forward_in_spans_matches_naive_with_gradients(name, monkeypatch):
    pack, heads, topk = CASES[name]
    q, k, _ = make_inputs(pack, *heads)
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, q.device)
    config = triton_backend.TileConfig(row_state_bytes=_state_bytes(name, 20))
    plan = triton_backend.make_plan(q, k, layout, topk, 1.0, config=config)
    assert len(plan.spans) > 2 and plan.grouping is None       # the backward groups the kept selection itself
    _run(pack, heads, topk, torch.float32, monkeypatch, shared_routing=False, row_state_bytes=_state_bytes(name, 20))


@in_interpreter
@pytest.mark.parametrize("name", SPAN_CASES)
def test_triton_forward_in_spans_without_gradients_routes_each_span_and_matches(name, monkeypatch):
    pack, heads, topk = CASES[name]
    monkeypatch.setattr(triton_backend, "CONFIG", triton_backend.TileConfig(
        route_m=16, route_n=16, pair_m=16, fwd_n=16, own_m=16, row_state_bytes=_state_bytes(name, 20)))
    routed = []
    select = triton_backend.routing.select_blocks

    def spy(*args, span=None, **kwargs):
        routed.append(span)
        return select(*args, span=span, **kwargs)

    monkeypatch.setattr(triton_backend.routing, "select_blocks", spy)
    q, k, v = make_inputs(pack, *heads, dtype=torch.float32, separated=True)
    layout = build_layout(pack.cu_seqlens.tolist(), pack.block_size, q.device)
    with torch.no_grad():
        got = triton_backend.moba_triton(q, k, v, layout, topk=topk, softmax_scale=0.3)
    want = moba_naive(q, k, v, layout, topk=topk, softmax_scale=0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # One routing per span, none of all tokens: no selection of the whole pack is ever held.
    assert len(routed) > 2 and None not in routed
    assert [span[2:] for span in routed] == list(zip([0] + [s[3] for s in routed[:-1]], [s[3] for s in routed]))
    assert routed[-1][3] == pack.tokens
