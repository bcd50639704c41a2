"""The triton backend's forward spans: runs of whole blocks whose fp32 row state fits the budget."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moba_train.ops.moba import build_layout

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: pip install 'moba-train[triton]'")

PER_TOKEN = 4 * (16 + 2) * 4            # 4 heads of 16: fp32 (acc, max, sum) per row


@pytest.mark.parametrize("docs,block_size,budget_tokens", [
    ((100,), 10, 1000),                 # fits: one span
    ((100,), 10, 35),                   # 3 blocks a span
    ((37, 113, 150), 16, 40),           # ragged documents: a span may cross documents
    ((100, 97), 48, 20),                # every block larger than the budget: a span each
    ((5, 3, 200), 64, 64),
], ids=["fits", "even", "ragged-docs", "blocks-over-budget", "short-docs"])
def test_spans_cover_every_block_once_within_the_budget(docs, block_size, budget_tokens):
    from moba_train.ops.moba.triton import _spans
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    layout = build_layout(cu, block_size, torch.device("cpu"))
    spans = _spans(layout, 4, 16, budget_tokens * PER_TOKEN)
    starts = layout.block_start.tolist() + [cu[-1]]
    assert spans[0][0] == 0 and spans[0][2] == 0 and spans[-1][1] == layout.num_blocks and spans[-1][3] == cu[-1]
    for (b0, b1, t0, t1), nxt in zip(spans, spans[1:] + [None]):
        assert b1 > b0 and (t0, t1) == (starts[b0], starts[b1])
        assert t1 - t0 <= budget_tokens or b1 == b0 + 1        # only a lone block may exceed the budget
        if nxt is not None:
            assert nxt[0] == b1
            assert starts[b1 + 1] - t0 > budget_tokens         # greedy: the next block did not fit
    if cu[-1] <= budget_tokens:
        assert len(spans) == 1
