"""Passkey evaluation wall time with the trials of one length generated one at a time, `--samples` at a time,
or all at once (every depth and sample: `eval.passkey.batch_tokens` >= their tokens), on the embedded
SmolLM2-135M with MoBA in every layer, same run.

CPU:  python benchmarks/passkey.py --device cpu --lengths 512 --samples 4
GPU:  python benchmarks/passkey.py --device cuda --dtype bf16 --lengths 2048 8192 32768 --samples 4
Prints a markdown table with how many answers equal the one-at-a-time ones (greedy either way; in 16-bit a
batched matrix product may round differently and flip a near-tie).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moba_train.eval.passkey import run_passkey                              # noqa: E402
from moba_train.models import AttentionPlan, attach_plan                     # noqa: E402
from moba_train.models.loading import load_embedded                          # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--lengths", type=int, nargs="+", default=[512])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=3)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    loaded = load_embedded(dtype=dtype)
    model = loaded.model.to(args.device)
    layers = model.config.num_hidden_layers
    attach_plan(model, AttentionPlan.from_config({"block_size": args.block_size, "topk": args.topk,
                                                  "moba_layers": "all"}, layers))
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"# {date.today()} {device} {args.dtype} torch {torch.__version__}; argv {sys.argv[1:]}")
    print("| length | batch_tokens | haystacks per generate | seconds | accuracy | speed vs one at a time | "
          "same answers |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        answers, base = None, None
        for batch_tokens in (length, length * args.samples, length * args.samples * len(args.depths)):
            t0 = time.perf_counter()
            result = run_passkey(model, loaded.tokenizer, [length], args.depths, samples=args.samples,
                                 batch_tokens=batch_tokens)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            got = [(t.key, t.answer) for t in result.trials]
            answers, base = answers or got, base or seconds
            same = sum(a == b for a, b in zip(got, answers))
            print(f"| {length} | {batch_tokens} | {batch_tokens // length} | {seconds:.2f} | "
                  f"{result.accuracy:.2f} | {base / seconds:.2f}x | {same}/{len(got)} |", flush=True)


if __name__ == "__main__":
    main()
