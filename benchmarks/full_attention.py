"""Full causal attention over packed documents: one SDPA call per document against one varlen call per pack.

The model's full-attention layers run `moba_train.ops.full_attn.full_attn_varlen`. Its `sdpa` backend
calls torch SDPA once per document (cuDNN or FlashAttention per call); `varlen` makes one call over the
whole pack (torch.nn.attention.varlen, FlashAttention); `flash` and `fa4` (FlashAttention-4, Hopper and
Blackwell, head_dim 128) are one call per pack too, when installed. Which is faster depends on the pack: a few long
documents or many short ones (code files, chat records). Forward + backward, median after warm-up:

    python benchmarks/full_attention.py --packs 1x32768 1x131072 16x2048 128x256 --backends sdpa varlen
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moba_train.ops.full_attn import full_attn_varlen  # noqa: E402


def pack(spec: str, hq: int, hkv: int, d: int, device: str, dtype: torch.dtype):
    n_docs, doc_len = (int(x) for x in spec.split("x"))
    T = n_docs * doc_len
    q = torch.randn(T, hq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(T, hkv, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    cu = torch.arange(0, T + 1, doc_len, dtype=torch.int32, device=device)
    return q, k, v, cu, doc_len


def time_case(backend: str, q, k, v, cu, max_len: int, warmup: int, repeats: int) -> float:
    grad = torch.randn_like(q)
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = full_attn_varlen(q, k, v, cu, max_len, backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packs", nargs="+", default=["1x32768", "1x131072", "16x2048", "128x256"],
                   help="DOCSxLENGTH, e.g. 16x2048: 16 documents of 2,048 tokens")
    p.add_argument("--backends", nargs="+", default=["sdpa", "varlen"])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/full_attention.py times GPU kernels: run it on a CUDA machine")
    rows = []
    for spec in args.packs:
        q, k, v, cu, doc_len = pack(spec, *args.heads, args.head_dim, "cuda", torch.bfloat16)
        n_docs = cu.numel() - 1
        causal_tflop = 3.5 * 4 * args.head_dim * args.heads[0] * n_docs * doc_len * (doc_len + 1) / 2 / 1e12
        for backend in args.backends:
            s = time_case(backend, q, k, v, cu, doc_len, args.warmup, args.repeats)
            row = {"pack": spec, "backend": backend, "fwd_bwd_ms": s * 1e3, "tflops": causal_tflop / s,
                   "heads": args.heads, "head_dim": args.head_dim, "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("| pack | " + " | ".join(f"{b} ms (TFLOP/s)" for b in args.backends) + " |")
    print("|---|" + "---|" * len(args.backends))
    for spec in args.packs:
        cells = [f"{r['fwd_bwd_ms']:.2f} ({r['tflops']:.0f})" for r in rows if r["pack"] == spec]
        print(f"| {spec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
