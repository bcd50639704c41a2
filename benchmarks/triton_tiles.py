"""Tile configurations of the triton MoBA backend per head dim: which fit shared memory and how fast they run.

    python benchmarks/triton_tiles.py --head-dims 64 128 192 256 --length 32768

Times forward+backward (bf16, Hq 32 / Hkv 8, block 512, top-8, one document) for the per-head-dim default
(`tiles_for`) and the candidates below, with CUDA events (median of --repeats after a warm-up). A config that
asks for more shared memory than the GPU has is reported as such. Picks go into TILES_BY_BLOCK_D in
moba_train/ops/moba/triton.py; the numbers into docs/kernel-notes.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

from moba_train.ops.moba import build_layout
from moba_train.ops.moba import triton as tb

CANDIDATES = {
    "halved": dict(pair_m=64, fwd_n=32, own_m=64, fwd_stages=2, dq_n=32, dq_stages=1, dkv_m=32, dkv_n=64,
                   dkv_stages=1, route_m=32),
    "halved-2stage": dict(pair_m=64, fwd_n=32, own_m=64, fwd_stages=2, dq_n=32, dq_stages=2, dkv_m=32, dkv_n=64,
                          dkv_stages=2, route_m=32),
    "m64-n64": dict(pair_m=64, fwd_n=64, own_m=64, fwd_stages=2, dq_n=32, dq_stages=1, dkv_m=32, dkv_n=64,
                    dkv_stages=1, route_m=32),
    "narrow-4warp": dict(pair_m=64, fwd_n=32, own_m=64, fwd_stages=2, fwd_warps=4, dq_n=32, dq_stages=1, dq_warps=4,
                         dkv_m=16, dkv_n=64, dkv_stages=1, dkv_warps=4, route_m=32),
}


def time_config(config, head_dim, length, repeats):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(length, h, head_dim, device="cuda", generator=g).bfloat16().requires_grad_()
               for h in (32, 8, 8))
    dout = torch.randn_like(q)
    layout = build_layout([0, length], 512, torch.device("cuda"))
    tb.CONFIG = config

    def step():
        out = tb.moba_triton(q, k, v, layout, topk=8, softmax_scale=head_dim ** -0.5)
        torch.autograd.grad(out, (q, k, v), dout)

    step()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 80, 96, 128, 192, 256])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--candidates", nargs="*", default=None, help="names from CANDIDATES to try for head_dim > 128")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fwd+bwd ms, bf16, 32/8 heads, "
          f"{args.length} tokens, block 512, top-8")
    for d in args.head_dims:
        configs = {"default": tb.tiles_for(d)}
        if d > 128:
            for name in args.candidates if args.candidates is not None else CANDIDATES:
                configs[name] = dataclasses.replace(tb.TileConfig(), **CANDIDATES[name])
        for name, config in configs.items():
            try:
                ms = time_config(config, d, args.length, args.repeats)
                print(json.dumps({"head_dim": d, "config": name, "fwd_bwd_ms": round(ms, 2)}), flush=True)
            except Exception as e:     # noqa: BLE001 - out of resource: shared memory, reported per config
                print(json.dumps({"head_dim": d, "config": name, "error": str(e).splitlines()[0][:160]}), flush=True)
            torch.cuda.empty_cache()
    tb.CONFIG = None


if __name__ == "__main__":
    main()
