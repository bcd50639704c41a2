"""Where one attention call's device time goes: CUDA kernel time by kernel, for any backend of attention.py.

    python benchmarks/kernel_profile.py --settings a --backends triton sdpa-cudnn fa4 --mode fwd+bwd

One warm-up step, then one step under torch.profiler; prints, per (setting, backend), each kernel's device
time (ms, share of the step's kernel time, launches) and, with the work the backend must do (attention.py's
convention), the rate of the whole step. Kernel names are shortened to the function name. GPU only.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from attention import DTYPES, SETTINGS, attention_fn, work_flops  # noqa: E402


def short_name(name: str) -> str:
    """'void at::native::(anonymous)::foo_kernel<...>(...)' -> 'foo_kernel'; Triton names stay as they are."""
    name = re.sub(r"\([^()]*\)$", "", name.strip())          # the parameter list
    while re.search(r"<[^<>]*>", name):
        name = re.sub(r"<[^<>]*>", "", name)                   # template arguments, innermost first
    return name.split("::")[-1].replace("void ", "").strip()[:60]


def profile_one(s, backend: str, mode: str, dtype) -> tuple[list[tuple[str, float, int]], float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    T, (Hq, Hkv) = s.batch * s.length, s.heads
    q, k, v = (torch.randn((T, h, s.head_dim), generator=g, device="cuda", dtype=dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    grad = torch.randn((T, Hq, s.head_dim), generator=g, device="cuda", dtype=dtype)
    fn = attention_fn(backend, s, "cuda")

    def step():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out = fn(q, k, v)
            if mode == "fwd+bwd":
                out.backward(grad.view(s.batch, s.length, Hq, s.head_dim).transpose(1, 2) if out.dim() == 4 else grad)
        q.grad = k.grad = v.grad = None

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            slot = by_kernel[short_name(e.name)]
            slot[0] += e.device_time / 1e3    # us -> ms
            slot[1] += 1
    rows = sorted(((n, ms, c) for n, (ms, c) in by_kernel.items()), key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["a"], choices=sorted(SETTINGS))
    p.add_argument("--only", nargs="*", default=[], help="setting names to keep (prefix match), e.g. 'a 128K bs512'")
    p.add_argument("--backends", nargs="+", default=["triton"])
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--top", type=int, default=12, help="kernels listed per case (the rest summed)")
    p.add_argument("--triton-tiles", help="JSON of TileConfig fields for the triton backend, e.g. '{\"dq_fused\": true}'")
    args = p.parse_args()
    if args.triton_tiles:
        from moba_train.ops.moba import triton as triton_backend
        triton_backend.CONFIG = triton_backend.TileConfig(**json.loads(args.triton_tiles))
    if not torch.cuda.is_available():
        sys.exit("kernel_profile.py needs a CUDA device")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, {args.mode}, "
          f"triton tiles {args.triton_tiles or 'default'}")
    for s in (s for name in args.settings for s in SETTINGS[name]):
        if args.only and not any(s.name.startswith(o) for o in args.only):
            continue
        if args.mode not in s.modes:
            continue
        for backend in args.backends:
            rows, total = profile_one(s, backend, args.mode, DTYPES[args.dtype])
            tflops = work_flops(s, backend) * (3.5 if args.mode == "fwd+bwd" else 1.0) / total / 1e9
            print(f"\n## {s.name}, {backend}: {total:.1f} ms of kernels ({tflops:.0f} TFLOP/s on its work)")
            print("| kernel | ms | share | launches |\n|---|---|---|---|")
            for name, ms, count in rows[:args.top]:
                print(f"| {name} | {ms:.2f} | {100 * ms / total:.1f}% | {count} |")
            rest = rows[args.top:]
            if rest:
                print(f"| ({len(rest)} others) | {sum(r[1] for r in rest):.2f} | "
                      f"{100 * sum(r[1] for r in rest) / total:.1f}% | {sum(r[2] for r in rest)} |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
