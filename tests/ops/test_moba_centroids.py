"""The routing convention is explicit: centroids="reference" rounds each block's mean key to the input dtype before
scoring it (MoonshotAI's), "fp32" keeps it in fp32; every backend picks the same blocks for the same choice.

The crafted near-tie: in bf16 (one unit in the last place at 1.0 is u = 2^-7), block A's mean key is
(1 + 0.625u, 1) and block B's (1 + 0.3125u, 1 + 0.375u) in its first two dimensions. Scored in fp32 against q = (1, 1), B wins
(2 + 0.6875u > 2 + 0.625u); rounded to bf16 first, A is (1 + u, 1) and B (1, 1), so A wins. Values mark
the blocks (A +1, B -1, the query's own block 0), so the output's sign tells which block each query took.
"""

from __future__ import annotations

import pytest
import torch

from moba_train.ops import moba_attn_varlen
from moba_train.ops.moba import BACKENDS, build_layout, select_blocks

pytestmark = pytest.mark.usefixtures("nan_poisoned_allocations")   # tests/ops/conftest.py

BS, D, U, BLOCKS = 64, 64, 2.0 ** -7, 16


def near_tie(device="cpu"):
    """One document of 16 blocks: A, B, 13 blocks the gate never wants (keys opposite the queries), then the
    queries' block; bf16."""
    k = torch.zeros(BLOCKS * BS, 1, D)
    k[:, 0, :2] = -1.0
    k[:BS, 0, :2] = 1.0
    k[:40, 0, 0] += U                     # A: 40/64 of its keys one ulp up in dim 0
    k[BS:2 * BS, 0, :2] = 1.0
    k[BS:BS + 20, 0, 0] += U              # B: 20/64 up in dim 0 ...
    k[BS:BS + 24, 0, 1] += U              # ... and 24/64 up in dim 1
    k[-BS:, 0, :2] = 1.0
    q = torch.zeros(BLOCKS * BS, 1, D)
    q[:, 0, :2] = 1.0
    v = torch.zeros(BLOCKS * BS, 1, D)
    v[:BS, 0, 0], v[BS:2 * BS, 0, 0] = 1.0, -1.0
    cu = torch.tensor([0, BLOCKS * BS], dtype=torch.int32, device=device)
    return [t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v)] + [cu]


def picked(out) -> set[str]:
    """Which of A (+) / B (-) the queries of the last block attended, from the sign of their output."""
    sign = out[-BS:, 0, 0].float().sign()
    return {"A" if s > 0 else "B" for s in sign.tolist()}


@pytest.mark.parametrize("centroids,winner", [("reference", "A"), ("fp32", "B")])
def test_the_gate_picks_by_the_convention_on_a_crafted_near_tie(centroids, winner):
    q, k, v, cu = near_tie()
    layout = build_layout(cu.tolist(), BS, q.device)
    sel = select_blocks(q, k, layout, topk=2, centroids=centroids)[-BS:, 0, 0]
    assert set(sel.tolist()) == {0 if winner == "A" else 1}


def test_fp32_inputs_route_the_same_under_both_conventions():
    q, k, v, cu = near_tie()
    q, k = q.float(), k.float()
    layout = build_layout(cu.tolist(), BS, q.device)
    assert torch.equal(select_blocks(q, k, layout, 2, "reference"), select_blocks(q, k, layout, 2, "fp32"))


def backends_on(device: str) -> list:
    names = [n for n, b in BACKENDS.items() if device in b.devices]
    return [pytest.param(n, marks=[pytest.mark.gpu] if device == "cuda" else []) for n in names]


@pytest.mark.parametrize("centroids,winner", [("reference", "A"), ("fp32", "B")])
@pytest.mark.parametrize("device,backend", [("cpu", b) for b in ("naive", "lean")]
                         + [pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("naive", "lean", "triton",
                                                                                     "flex", "flash")])
def test_every_backend_attends_the_block_the_convention_picks(device, backend, centroids, winner):
    reason = BACKENDS[backend].missing()
    if reason:
        pytest.skip(reason)
    q, k, v, cu = near_tie(device)
    out = moba_attn_varlen(q, k, v, cu, BLOCKS * BS, block_size=BS, topk=2, backend=backend, centroids=centroids)
    assert picked(out) == {winner}
    naive = moba_attn_varlen(q, k, v, cu, BLOCKS * BS, block_size=BS, topk=2, backend="naive", centroids=centroids)
    torch.testing.assert_close(out, naive, atol=2e-2, rtol=2e-2)


def test_an_unknown_convention_is_refused_naming_the_choices():
    q, k, v, cu = near_tie()
    with pytest.raises(ValueError, match=r"centroids must be one of \['reference', 'fp32'\]"):
        moba_attn_varlen(q, k, v, cu, BLOCKS * BS, block_size=BS, topk=2, centroids="bf16")
