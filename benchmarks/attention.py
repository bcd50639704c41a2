"""MoBA backends against full causal SDPA: forward and forward+backward time, TFLOP/s, peak memory.

CPU (each measurement in a fresh process, so peak RSS belongs to that case alone):
    python benchmarks/attention.py --device cpu --lengths 4096 16384 65536
GPU, any shape:
    python benchmarks/attention.py --device cuda --dtype bf16 --lengths 32768 131072 --heads 32 8 --head-dim 128
GPU, the settings of docs/benchmarks.md (all in one process, on one device):
    python benchmarks/attention.py --device cuda --dtype bf16 --settings a b c \
        --backends sdpa-flash sdpa-cudnn fa4 flex triton

TFLOP/s count the work each method must do: causal attention for SDPA, each query's own block
(causal) plus its selected blocks for MoBA; 4 * D FLOPs per (query head, key) forward and 3.5x that
for forward+backward (FlashAttention's convention). `fa4` is FlashAttention-4's dense causal kernel (the
full-attention layers' backend of that name, `pip install 'moba-train[fa4]'`), a baseline beside cuDNN. Prints a markdown table and writes JSON lines with --out.
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
from dataclasses import asdict, dataclass
from datetime import date

import torch
import torch.nn.functional as F

from moba_train.ops import moba_attn_varlen
from moba_train.ops.full_attn import full_attn_varlen

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_KERNELS = ("sdpa", "sdpa-flash", "sdpa-cudnn")
DENSE = (*SDPA_KERNELS, "fa4")          # the dense causal baselines: their work is every earlier key


@dataclass(frozen=True)
class Setting:
    name: str
    length: int                 # tokens per sequence (one document each)
    batch: int
    heads: tuple[int, int]      # (Hq, Hkv)
    head_dim: int
    block_size: int
    topk: int
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")


# The settings of issue 7 (a: the paper's training shapes, b: FlashMoBA's, c: the paper's 1M forward).
SETTINGS = {
    "a": [Setting(f"a {n // 1024}K bs{bs} top{k}", n, 1, (32, 8), 128, bs, k)
          for n in (32768, 131072) for bs, k in ((512, 8), (4096, 4))],
    "b": [Setting("b 512K x2 bs128 top8", 524288, 2, (16, 16), 128, 128, 8)],
    "c": [Setting("c 1M bs4096 top12", 1 << 20, 1, (32, 8), 128, 4096, 12, modes=("fwd",))],
}


def work_flops(s: Setting, backend: str) -> float:
    """Forward FLOPs of the keys each query must see: causal for SDPA, own block + selected blocks for MoBA."""
    pos = torch.arange(s.length, dtype=torch.float64)
    if backend in DENSE:
        keys = (pos + 1).sum()
    else:
        blk = torch.div(pos, s.block_size, rounding_mode="floor")
        keys = (pos - blk * s.block_size + 1 + torch.clamp(blk, max=s.topk - 1) * s.block_size).sum()
    return 4.0 * s.head_dim * s.heads[0] * s.batch * float(keys)


def attention_fn(backend: str, s: Setting, device: str):
    if backend in SDPA_KERNELS:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = {"sdpa": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

        def fn(q, k, v):  # [B*L, H, D] -> [B, H, L, D]
            qt, kt, vt = (x.view(s.batch, s.length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            if kernel is None:
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        return fn
    cu = torch.arange(0, s.batch + 1, dtype=torch.int32, device=device) * s.length
    if backend == "fa4":
        return lambda q, k, v: full_attn_varlen(q, k, v, cu, s.length, backend="fa4")
    return lambda q, k, v: moba_attn_varlen(q, k, v, cu, s.length, block_size=s.block_size, topk=s.topk, backend=backend)


def naive_estimate_gb(s: Setting) -> float:
    # per query head the oracle keeps scores, probabilities and masks of T x T alive for backward
    return s.heads[0] * s.length ** 2 * (4 + 4 + 1 + 1) / 2**30


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure_one(s: Setting, backend: str, mode: str, args) -> dict:
    """Run one (setting, backend, mode) case in this process and return its numbers."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=args.device).manual_seed(0)
    T, (Hq, Hkv) = s.batch * s.length, s.heads
    q = torch.randn((T, Hq, s.head_dim), generator=g, device=args.device, dtype=dtype).requires_grad_()
    k = torch.randn((T, Hkv, s.head_dim), generator=g, device=args.device, dtype=dtype).requires_grad_()
    v = torch.randn((T, Hkv, s.head_dim), generator=g, device=args.device, dtype=dtype).requires_grad_()
    grad_out = torch.randn((T, Hq, s.head_dim), generator=g, device=args.device, dtype=dtype)
    grad_sdpa = grad_out.view(s.batch, s.length, Hq, s.head_dim).transpose(1, 2)
    fn = attention_fn(backend, s, args.device)

    def step():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out = fn(q, k, v)
            if mode == "fwd+bwd":
                out.backward(grad_sdpa if out.dim() == 4 else grad_out)
        q.grad = k.grad = v.grad = None

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, started = [], time.perf_counter()
    for i in range(args.warmup):
        step()
    if args.device == "cuda":
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    # Long cases stop early: at least one timed run, then more while under --case-seconds.
    while len(times) < args.repeats and (not times or time.perf_counter() - started < args.case_seconds):
        sync(args.device)
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB
    ms = 1e3 * statistics.median(times)
    flops = work_flops(s, backend) * (3.5 if mode == "fwd+bwd" else 1.0)
    return {"setting": s.name, "backend": backend, "mode": mode, "ms": ms, "tflops": flops / ms / 1e9,
            "peak_mib": peak, "repeats": len(times)}


def measure_ceilings(device) -> dict:
    """The two measured ceilings (METHOD.md): device-to-device copy bandwidth and bf16 matmul rate."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    res = {}
    for name, op, work in (("copy_TBps", lambda: y.copy_(x), 2 * x.numel() / 1e12),
                           ("bf16_matmul_TFLOPs", lambda: a @ b, 2 * 8192**3 / 1e12)):
        for _ in range(3):
            op()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            op()
        sync(device)
        res[name] = round(work * 10 / (time.perf_counter() - t0), 2)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), help="named settings (instead of --lengths ...)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, nargs="+", default=[64], help="one or more: a setting per head dim")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["sdpa", "naive", "lean"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--skip", nargs="*", default=[], metavar="SETTING:BACKEND",
                   help="leave these cases out, e.g. 'b 512K x2 bs128 top8:flex' (prefix match on the setting)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case-seconds", type=float, default=10.0, help="stop repeating a case after this long")
    p.add_argument("--naive-limit-gb", type=float, default=16.0, help="skip the dense oracle above this estimate")
    p.add_argument("--out", help="append JSON lines here")
    p.add_argument("--triton-tiles", help="JSON of TileConfig fields for the triton backend, e.g. '{\"pair_m\": 64}'")
    # internal: measure one case in a child process (CPU)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.triton_tiles:
        from moba_train.ops.moba import triton as triton_backend
        triton_backend.CONFIG = triton_backend.TileConfig(**json.loads(args.triton_tiles))
    if args.case:
        case = json.loads(args.case)
        s = Setting(**{**case["setting"], "heads": tuple(case["setting"]["heads"])})
        print(json.dumps(measure_one(s, case["backend"], case["mode"], args)))
        return

    if args.settings:
        settings = [s for name in args.settings for s in SETTINGS[name]]
    else:
        settings = [Setting(f"{n}" if len(args.head_dim) == 1 else f"{n} D{d}", n, args.batch, tuple(args.heads), d,
                            args.block_size, args.topk, tuple(args.modes)) for d in args.head_dim for n in args.lengths]
    header = {"date": str(date.today()), "argv": sys.argv[1:], "torch": torch.__version__,
              "triton_tiles": args.triton_tiles,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()}
    if args.device == "cuda":
        header["ceilings"] = measure_ceilings(args.device)
    print(json.dumps(header), file=sys.stderr, flush=True)

    rows = []
    for s in settings:
        for backend in args.backends:
            for mode in (m for m in args.modes if m in s.modes):
                row = {"setting": s.name, "backend": backend, "mode": mode}
                if any(s.name.startswith(x.split(":")[0]) and backend == x.split(":")[1] for x in args.skip):
                    row["skipped"] = "not run"
                elif backend == "naive" and naive_estimate_gb(s) > args.naive_limit_gb:
                    row["skipped"] = f"needs ~{naive_estimate_gb(s):.0f} GiB"
                elif args.device == "cpu":
                    case = json.dumps({"setting": asdict(s), "backend": backend, "mode": mode})
                    cmd = [sys.executable, __file__, *sys.argv[1:], "--case", case]
                    if s.length >= 32768:  # a single timed run: these take minutes on 2 cores
                        cmd += ["--warmup", "0", "--repeats", "1"]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode != 0:
                        row["skipped"] = f"failed: {res.stderr.strip().splitlines()[-1][:80]}"
                    else:
                        row = json.loads(res.stdout.strip().splitlines()[-1])
                else:
                    try:
                        row = measure_one(s, backend, mode, args)
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({**row, **header}) + "\n")
    print_table(rows, settings, args, header)


def print_table(rows, settings, args, header):
    print(f"\n{header['device']}, torch {torch.__version__}, {args.dtype}, {header['date']}"
          + (f", measured ceilings {header['ceilings']}" if "ceilings" in header else "") + "\n")
    names = {"sdpa-cudnn": "cuDNN", "sdpa-flash": "FA2", "fa4": "FA4", "sdpa": "SDPA"}
    baselines = [b for b in names if b in args.backends]
    speed_cols = [(b, m) for b in baselines for m in ("fwd", "fwd+bwd")]
    print("| setting | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB |"
          + "".join(f" {m} vs {names[b]} |" for b, m in speed_cols))
    print("|---" * (7 + len(speed_cols)) + "|")
    by = {(r["setting"], r["backend"], r["mode"]): r for r in rows}
    for s in settings:
        for backend in args.backends:
            f, b = by.get((s.name, backend, "fwd"), {}), by.get((s.name, backend, "fwd+bwd"), {})
            if not f and not b:
                continue
            def cell(r, key, fmt):
                if key in r:
                    return fmt.format(r[key])
                return r.get("skipped", "-") if key == "ms" else "-"   # why a case did not run: its time cell alone

            def speed(base_backend, mode):
                r = f if mode == "fwd" else b
                base = by.get((s.name, base_backend, mode), {}).get("ms")
                return f"{base / r['ms']:.2f}x" if base and "ms" in r else "-"
            peak = b if "peak_mib" in b else f
            print(f"| {s.name} | {backend} | {cell(f, 'ms', '{:.1f}')} | {cell(f, 'tflops', '{:.3g}')} | "
                  f"{cell(b, 'ms', '{:.1f}')} | {cell(b, 'tflops', '{:.3g}')} | {cell(peak, 'peak_mib', '{:.0f}')} |"
                  + "".join(f" {speed(bb, m)} |" for bb, m in speed_cols))


if __name__ == "__main__":
    main()
