"""Input checks and the block layout of a packed varlen batch.

Every backend sees the same layout: documents are cut into blocks of `block_size` tokens
(the last block of a document may be shorter), numbered globally in token order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q, k, v, cu_seqlens, max_seqlen, block_size, topk, softmax_scale) -> list[int]:
    """Raise ValueError naming the problem; return cu_seqlens as a host list."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim] (flash-attn varlen layout), got {shape}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: tokens and head_dim must agree")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [n_docs + 1], got {got}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v and cu_seqlens must be on one device, got {q.device}, {k.device}, {v.device}, {cu_seqlens.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens needs at least two entries [0, T]")
    cu = host_boundaries(cu_seqlens)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {cu[:16]}{'...' if len(cu) > 16 else ''}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at the number of tokens T={T}, got {cu[-1]}")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest document ({longest} tokens)")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1 (1 = own block only), got {topk!r}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale!r}")
    return cu


@dataclass(frozen=True)
class BlockLayout:
    """Where every block of a packed batch lies. Tensors live on the inputs' device."""

    block_size: int
    cu_seqlens: list[int]          # host copy
    block_start: torch.Tensor      # [NB] int64: first token of each block
    block_len: torch.Tensor        # [NB] int64: tokens in each block (== block_size except a doc's last)
    token_block: torch.Tensor      # [T]  int64: global block of each token
    token_doc_first_block: torch.Tensor  # [T] int64: global id of the first block of the token's document
    doc_first_block: list[int]     # host: first global block of each document, plus NB at the end

    @property
    def num_blocks(self) -> int:
        return self.doc_first_block[-1]

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]


# Every attention layer of a forward (and its recompute) gets the same cu_seqlens tensor. Reading it to the
# host is a device sync, and building the block tables costs a few launches: done once per tensor, the
# results ride on the tensor itself, keyed by its version counter (an in-place change invalidates them).

def host_boundaries(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a Python list, read from the device once per tensor."""
    cached = getattr(cu_seqlens, "_moba_host_cu", None)
    if cached is not None and cached[0] == cu_seqlens._version:
        return cached[1]
    cu = cu_seqlens.tolist()
    cu_seqlens._moba_host_cu = (cu_seqlens._version, cu)
    return cu


def layout_for(cu_seqlens: torch.Tensor, block_size: int) -> BlockLayout:
    """build_layout for this tensor's boundaries and block size, built once per tensor."""
    cache = getattr(cu_seqlens, "_moba_layouts", None)
    if cache is None or cache[0] != cu_seqlens._version:
        cache = (cu_seqlens._version, {})
        cu_seqlens._moba_layouts = cache
    if block_size not in cache[1]:
        cache[1][block_size] = build_layout(host_boundaries(cu_seqlens), block_size, cu_seqlens.device)
    return cache[1][block_size]


def build_layout(cu: list[int], block_size: int, device: torch.device) -> BlockLayout:
    lens = [b - a for a, b in zip(cu, cu[1:])]
    nblocks = [-(-n // block_size) for n in lens]
    doc_first_block = [0]
    for n in nblocks:
        doc_first_block.append(doc_first_block[-1] + n)

    lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
    nblocks_t = torch.tensor(nblocks, dtype=torch.int64, device=device)
    starts_t = torch.tensor(cu[:-1], dtype=torch.int64, device=device)
    first_t = torch.tensor(doc_first_block[:-1], dtype=torch.int64, device=device)

    block_doc = torch.repeat_interleave(torch.arange(len(lens), device=device), nblocks_t)
    block_idx_in_doc = torch.arange(doc_first_block[-1], device=device) - first_t[block_doc]
    block_start = starts_t[block_doc] + block_idx_in_doc * block_size
    block_len = torch.minimum(lens_t[block_doc] - block_idx_in_doc * block_size, torch.tensor(block_size, device=device))

    token_doc = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
    pos = torch.arange(cu[-1], device=device) - starts_t[token_doc]
    token_block = first_t[token_doc] + pos // block_size
    return BlockLayout(block_size, cu, block_start, block_len, token_block, first_t[token_doc], doc_first_block)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention math runs in fp32 (fp64 for fp64 inputs), whatever the storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
