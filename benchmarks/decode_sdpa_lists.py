"""The padded (masked) dense decoding step: which SDPA backend list avoids SDPA's per-new-length host cost.

Why `cached_attention.MASKED_DECODE_SDPA_BACKENDS` is what it is. A left-padded batch (row b starts 1000 b + 7
slots late), one new query per row, over a cache that grows by one key per call (views of a preallocated buffer,
as MobaKVCache hands them), 32/8 heads of 128, bf16, batches 2 and 8, 32K and 128K keys. For each candidate list:
median ms per call over the growing cache and at a repeated length (host timer, synchronised), and the error
against an fp32 reference. CUDA only:
    python benchmarks/decode_sdpa_lists.py [calls per case, default 12]
Prints markdown tables; results: docs/benchmarks.md ("The masked dense step").
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as B_, sdpa_kernel

torch.manual_seed(0)
dev = "cuda"
HQ, HKV, D = 32, 8, 128
CANDIDATES = {
    "sdpa-own-choice": None,     # what the step ran before fafa423
    "cudnn": [B_.CUDNN_ATTENTION],
    "cudnn,efficient,math": [B_.CUDNN_ATTENTION, B_.EFFICIENT_ATTENTION, B_.MATH],   # MASKED_DECODE_SDPA_BACKENDS
    "flash,cudnn,efficient,math": [B_.FLASH_ATTENTION, B_.CUDNN_ATTENTION, B_.EFFICIENT_ATTENTION, B_.MATH],
    "efficient,math": [B_.EFFICIENT_ATTENTION, B_.MATH],
    "flash,efficient,math": [B_.FLASH_ATTENTION, B_.EFFICIENT_ATTENTION, B_.MATH],   # DECODE_SDPA_BACKENDS
}


def call(q, k, v, mask, backends, enable_gqa=True):
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def per_row(q, k, v, pads, backends):
    """Each row unmasked over its real keys (the padding is all on the left)."""
    outs = []
    with sdpa_kernel(backends):
        for b, p in enumerate(pads):
            outs.append(F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, p:], v[b:b + 1, :, p:],
                                                       enable_gqa=True))
    return torch.cat(outs)


def main(batch, L, steps):
    pads = [0] + [1000 * i + 7 for i in range(1, batch)]
    room = L + 3 * steps + 8
    kb = torch.randn(batch, HKV, room, D, device=dev, dtype=torch.bfloat16)
    vb = torch.randn(batch, HKV, room, D, device=dev, dtype=torch.bfloat16)
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    valid_full = torch.arange(room, device=dev)[None, :] >= torch.tensor(pads, device=dev)[:, None]
    # reference at length L
    k, v = kb[:, :, :L], vb[:, :, :L]
    mask = valid_full[:, None, None, :L]
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(HQ // HKV, 1),
                                         v.float().repeat_interleave(HQ // HKV, 1), attn_mask=mask)
    rows = []
    for name, backends in list(CANDIDATES.items()) + [("per-row-unmasked (flash,efficient,math)", "per-row")]:
        try:
            if backends == "per-row":
                fn = lambda n: per_row(q, kb[:, :, :n], vb[:, :, :n], pads,
                                       [B_.FLASH_ATTENTION, B_.EFFICIENT_ATTENTION, B_.MATH])
            else:
                fn = lambda n, b=backends: call(q, kb[:, :, :n], vb[:, :, :n], valid_full[:, None, None, :n], b)
            out = fn(L)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            torch.cuda.synchronize()
            n = L
            times = []
            for _ in range(steps):                          # growing: a new length each call
                n += 1
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(n)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            same = []
            for _ in range(steps):                          # repeated length
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(n)
                torch.cuda.synchronize()
                same.append(time.perf_counter() - t0)
            rows.append((name, 1e3 * statistics.median(times), 1e3 * statistics.median(same), err))
        except RuntimeError as e:      # a list none of whose kernels takes these inputs
            rows.append((name, float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:120]}"))
    print(f"\n### batch {batch}, {L // 1024}K keys, pads {pads}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| backends | ms/call growing | ms/call same length | rel err vs fp32 |")
    print("|---|---|---|---|")
    for name, g, s, e in rows:
        print(f"| {name} | {g:.3f} | {s:.3f} | {e if isinstance(e, str) else f'{e:.2e}'} |", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("decode_sdpa_lists.py measures SDPA's CUDA kernels: run it on a CUDA device")
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    for batch in (2, 8):
        for L in (32768, 131072):
            main(batch, L, steps)
