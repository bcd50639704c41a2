"""Zero-shot passkey retrieval of the embedded SmolLM2-135M with MoBA in every layer, by block size at a fixed
attended budget (block_size x topk = 1,536 keys per query: own block + top-(k-1) earlier blocks).

The question it answers: when a full-attention model is switched to MoBA, how much of its retrieval does the
gate keep before any training, and does a finer gate (more, smaller blocks) keep more? The first SmolLM2
conversion study (docs/benchmarks.md) trained block 512, top-3, and its passkey did not recover in 6M tokens.

    python benchmarks/gate_granularity.py --haystacks lee python           # CPU, fp32: ~3 min per row
    python benchmarks/gate_granularity.py --device cuda --dtype bf16 --lengths 2048 4096 8192 --samples 4

Prints a markdown table; --out appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
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

# (label, block_size, topk); None: full attention in every layer
GATES = [("full", None, None), ("block 512, top-3", 512, 3), ("block 256, top-6", 256, 6),
         ("block 128, top-12", 128, 12), ("block 64, top-24", 64, 24)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--haystacks", nargs="+", default=["lee", "python"])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--out", type=Path, help="append one JSON line per row")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    loaded = load_embedded(dtype=dtype)
    model = loaded.model.to(args.device).eval()
    layers = model.config.num_hidden_layers
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"# {date.today()} {device} {args.dtype} torch {torch.__version__}; argv {sys.argv[1:]}")
    print("| haystack | attention | " + " | ".join(f"{n:,}" for n in args.lengths) + " | all | seconds |")
    print("|---|---|" + "---|" * len(args.lengths) + "---|---|")
    for haystack in args.haystacks:
        for label, block_size, topk in GATES:
            spec = ({"moba_layers": "none"} if block_size is None else
                    {"block_size": block_size, "topk": topk, "moba_layers": "all"})
            attach_plan(model, AttentionPlan.from_config(spec, layers))
            t0 = time.perf_counter()
            with torch.no_grad():
                result = run_passkey(model, loaded.tokenizer, args.lengths, args.depths, samples=args.samples,
                                     seed=0, haystacks=haystack)
            seconds = time.perf_counter() - t0
            by_length = [sum(row[i] for row in result.accuracy_grid) / len(result.accuracy_grid)
                         for i in range(len(args.lengths))]
            print(f"| {haystack} | {label} | " + " | ".join(f"{a:.0%}" for a in by_length) +
                  f" | {result.accuracy:.0%} | {seconds:.0f} |", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps({"haystack": haystack, "attention": label, "block_size": block_size,
                                        "topk": topk, "lengths": args.lengths, "by_length": by_length,
                                        "accuracy": result.accuracy, "grid": result.accuracy_grid,
                                        "seconds": seconds}) + "\n")


if __name__ == "__main__":
    main()
