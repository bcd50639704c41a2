"""How the triton backend's kernels read keys and values: TMA descriptors where TMA can take the tensors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: pip install 'moba-train[triton]'")


def _kv(T, hkv, d, dtype, offset=0):
    flat = torch.randn(2, T * hkv * d + offset, dtype=torch.float32).to(dtype)
    return [x[offset:].view(T, hkv, d) for x in flat]


def test_descriptors_over_the_tensors_themselves_when_aligned():
    from moba_train.ops.moba.triton import _kv_sources
    k, v = _kv(64, 2, 64, torch.bfloat16)
    k_src, v_src, used = _kv_sources(k, v, 32, 64, use=True)
    assert used and k_src.base is k and v_src.base is v
    assert list(k_src.shape) == [64, 2, 64] and list(k_src.block_shape) == [32, 1, 64]


def test_off_or_rows_tma_cannot_take_read_the_tensors():
    from moba_train.ops.moba.triton import _kv_sources
    k, v = _kv(64, 2, 64, torch.bfloat16)
    assert _kv_sources(k, v, 32, 64, use=False) == (k, v, False)
    k, v = _kv(64, 1, 36, torch.bfloat16)             # rows of 72 bytes: not a multiple of 16
    assert _kv_sources(k, v, 32, 64, use=True) == (k, v, False)


def test_fp32_keys_and_values_are_read_without_descriptors():
    """fp32 TMA staging asked for more shared memory than an H100 has (test_moba_gpu's fp32 head-dim cases)."""
    from moba_train.ops.moba.triton import _kv_sources
    k, v = _kv(64, 2, 128, torch.float32)
    assert _kv_sources(k, v, 64, 128, use=True) == (k, v, False)
    k, v = _kv(64, 2, 128, torch.float16)
    assert _kv_sources(k, v, 64, 128, use=True)[2]


def test_a_view_at_an_odd_offset_is_copied_for_tma():
    from moba_train.ops.moba.triton import _kv_sources
    k, v = _kv(64, 2, 64, torch.bfloat16, offset=3)   # 6 bytes past an aligned allocation
    assert k.data_ptr() % 16 and k.is_contiguous()
    k_src, v_src, used = _kv_sources(k, v, 32, 64, use=True)
    assert used and k_src.base is not k and k_src.base.data_ptr() % 16 == 0
    assert torch.equal(k_src.base, k) and torch.equal(v_src.base, v)
