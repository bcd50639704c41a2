"""fla's NaN-poisoned allocations, for the CPU tests: inside a test that uses this fixture every torch.empty*
tensor starts as NaN (floats) or as the dtype's largest value (integers), so an output element or an index
that an operator forgets to write shows up as NaN or a failed lookup instead of passing by luck (fresh CPU
memory is often zero)."""

from __future__ import annotations

import pytest
import torch


def _poisoned(allocate):
    def allocate_poisoned(*args, **kwargs):
        t = allocate(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t
    return allocate_poisoned


@pytest.fixture
def nan_poisoned_allocations(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        # GPU tests poison the CUDA caching allocator instead (tests/ops/test_moba_gpu.py); patching torch.empty
        # there also reaches FlexAttention's compiled code (on 2026-12-02 the flex cases failed under it; whether
        # from the patch or from flex was not settled).
        yield
        return
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    new_empty = _poisoned(torch.Tensor.new_empty)
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: new_empty(self, *a, **kw))
    yield
