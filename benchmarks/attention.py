"""MoBA backends against full causal SDPA: forward and forward+backward time, peak memory.

CPU (each measurement in a fresh process, so peak RSS belongs to that case alone):
    python benchmarks/attention.py --device cpu --lengths 4096 16384 65536
GPU:
    python benchmarks/attention.py --device cuda --dtype bf16 --lengths 32768 131072 --heads 32 8 --head-dim 128

Prints a markdown table (for docs/benchmarks.md) and writes JSON lines with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

from moba_train.ops import moba_attn_varlen

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_fn(backend: str, args):
    T = args.length
    cu = torch.tensor([0, T], dtype=torch.int32, device=args.device)
    if backend.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = {"sdpa": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

        def fn(q, k, v):
            qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
            if kernel is None:
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        return fn
    return lambda q, k, v: moba_attn_varlen(q, k, v, cu, T, block_size=args.block_size, topk=args.topk, backend=backend)


def naive_estimate_gb(args) -> float:
    # per query head the oracle keeps scores, probabilities and masks of T x T alive for backward
    return args.heads[0] * args.length ** 2 * (4 + 4 + 1 + 1) / 2**30


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure_one(args) -> dict:
    """Run one (backend, length, mode) case in this process and return its numbers."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=args.device).manual_seed(0)
    Hq, Hkv = args.heads
    shape_q, shape_kv = (args.length, Hq, args.head_dim), (args.length, Hkv, args.head_dim)
    q = torch.randn(shape_q, generator=g, device=args.device, dtype=dtype).requires_grad_()
    k = torch.randn(shape_kv, generator=g, device=args.device, dtype=dtype).requires_grad_()
    v = torch.randn(shape_kv, generator=g, device=args.device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(shape_q, generator=g, device=args.device, dtype=dtype)
    fn = attention_fn(args.backend, args)

    def step():
        out = fn(q, k, v)
        if args.mode == "fwd+bwd":
            out.backward(grad_out.transpose(0, 1)[None] if out.dim() == 4 else grad_out)
        return out

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    times = []
    for i in range(args.warmup + args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(args.mode == "fwd+bwd"):
            step()
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB
    return {"backend": args.backend, "length": args.length, "mode": args.mode, "ms": 1e3 * statistics.median(times),
            "peak_mib": peak, "repeats": len(times)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["sdpa", "naive", "lean"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-limit-gb", type=float, default=16.0, help="skip the dense oracle above this estimate")
    p.add_argument("--out", help="append JSON lines here")
    # internal: measure one case in a child process
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.backend:
        print(json.dumps(measure_one(args)))
        return

    rows = []
    for length in args.lengths:
        for backend in args.backends:
            for mode in args.modes:
                args.length, args.backend, args.mode = length, backend, mode
                if backend == "naive" and naive_estimate_gb(args) > args.naive_limit_gb:
                    rows.append({"backend": backend, "length": length, "mode": mode,
                                 "skipped": f"needs ~{naive_estimate_gb(args):.0f} GiB"})
                    continue
                if args.device == "cpu":
                    cmd = [sys.executable, __file__, *sys.argv[1:], "--backend", backend, "--length", str(length),
                           "--mode", mode]
                    if length >= 32768:  # a single timed run: these take minutes on 2 cores
                        cmd += ["--warmup", "0", "--repeats", "1"]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode != 0:
                        rows.append({"backend": backend, "length": length, "mode": mode,
                                     "skipped": f"failed: {res.stderr.strip().splitlines()[-1][:80]}"})
                        continue
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                else:
                    row = measure_one(args)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({**row, "date": str(date.today()), "argv": sys.argv[1:]}) + "\n")
    print_table(rows, args)


def print_table(rows, args):
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}, torch {torch.__version__}, {args.dtype}, Hq {args.heads[0]}, Hkv {args.heads[1]}, "
          f"D {args.head_dim}, block {args.block_size}, top-{args.topk}, {date.today()}\n")
    print("| tokens | backend | fwd ms | fwd+bwd ms | fwd+bwd peak MiB | fwd+bwd vs SDPA |")
    print("|---|---|---|---|---|---|")
    by = {(r["length"], r["backend"], r["mode"]): r for r in rows}
    for length in args.lengths:
        base = by.get((length, "sdpa", "fwd+bwd"), {}).get("ms")
        for backend in args.backends:
            f, b = by.get((length, backend, "fwd"), {}), by.get((length, backend, "fwd+bwd"), {})
            cell = lambda r, key, fmt: (fmt.format(r[key]) if key in r else r.get("skipped", "-"))
            speed = f"{base / b['ms']:.2f}x" if base and "ms" in b else "-"
            print(f"| {length} | {backend} | {cell(f, 'ms', '{:.0f}')} | {cell(b, 'ms', '{:.0f}')} | "
                  f"{cell(b, 'peak_mib', '{:.0f}')} | {speed} |")


if __name__ == "__main__":
    main()
