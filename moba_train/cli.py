"""`moba-train`: until the staged trainer lands, a short demonstration of the MoBA operator."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from moba_train.ops import moba_attn_varlen


def main() -> None:
    torch.manual_seed(0)
    doc_lens = [3000, 5192]                 # two documents packed into one 8K sequence
    T, Hq, Hkv, D, block, topk = sum(doc_lens), 8, 2, 64, 512, 3
    cu = torch.tensor([0, doc_lens[0], T], dtype=torch.int32)
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)

    t0 = time.perf_counter()
    out = moba_attn_varlen(q, k, v, cu, max(doc_lens), block_size=block, topk=topk)
    t_moba = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                     v[a:b].transpose(0, 1), is_causal=True, enable_gqa=True)
                      .transpose(0, 1) for a, b in ((0, doc_lens[0]), (doc_lens[0], T))])
    t_full = time.perf_counter() - t0
    exact = moba_attn_varlen(q, k, v, cu, max(doc_lens), block_size=block, topk=99)
    print(f"MoBA block {block}, top-{topk} over {T} packed tokens ({len(doc_lens)} documents): "
          f"{t_moba * 1e3:.0f} ms; full causal SDPA {t_full * 1e3:.0f} ms")
    print(f"MoBA vs full attention, mean |diff| {(out - full).abs().mean():.3f}; "
          f"with top-k >= blocks {(exact - full).abs().max():.1e} (exact)")


if __name__ == "__main__":
    main()
