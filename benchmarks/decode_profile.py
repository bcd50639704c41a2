"""Where an eager decoding step's time goes: a randomly initialised decoder of benchmarks/decode.py's shapes,
MobaKVCache, batch 1, dense (`decode: full`) against the sparse kernel (`decode: moba`, decode_backend=triton).

Per mode: ms per step (synchronised after each, and issued back to back), cProfile of 30 steps (top functions by
own and by cumulative time), torch.profiler over 5 steps (CUDA kernels per step, aten ops by host time) and its
chrome trace (gaps between launches: open in chrome://tracing or ui.perfetto.dev). CUDA only:
    MODEL=smollm2-135m CTX=32768 OUT=/tmp/profile python benchmarks/decode_profile.py
Writes cprofile_*, torchprof_* and trace_*.json under OUT. Results: docs/benchmarks.md ("The eager step, profiled").
"""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import MODELS  # noqa: E402

from moba_train.models import AttentionPlan, MobaKVCache, attach_plan, build_from_config  # noqa: E402
from moba_train.models.hf_compat import model_cache_keyword, output_cache  # noqa: E402

MODEL = os.environ.get("MODEL", "smollm2-135m")
L = int(os.environ.get("CTX", "32768"))
STEPS = 30
OUT = os.environ.get("OUT", "/tmp")


def plan(model, decode):
    extra = {"decode": "full"} if decode == "full" else {"decode": "moba", "decode_backend": "triton"}
    return AttentionPlan.from_config({"block_size": 512, "topk": 3, "moba_layers": "all", **extra},
                                     model.config.num_hidden_layers)


def main():
    cfg = {**MODELS[MODEL], "max_position_embeddings": L + 4 * STEPS + 64}
    model = build_from_config(cfg, dtype=torch.bfloat16, seed=0).cuda().eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, L + 4 * STEPS + 8), device="cuda")
    attach_plan(model, plan(model, "moba"))
    kw = model_cache_keyword(model)
    cache = MobaKVCache.for_model(model, L + 4 * STEPS + 8)
    with torch.no_grad():
        out = model(input_ids=ids[:, :L], use_cache=True, logits_to_keep=1, **{kw: cache})
        cache = output_cache(out)
        t = L
        for decode in ("full", "moba"):
            attach_plan(model, plan(model, decode))

            def step(i):
                model(input_ids=ids[:, i:i + 1], **{kw: cache}, use_cache=True)

            for _ in range(3):
                step(t); t += 1
            times = []
            for _ in range(STEPS):
                torch.cuda.synchronize(); t0 = time.perf_counter(); step(t); torch.cuda.synchronize()
                times.append(time.perf_counter() - t0); t += 1
            # launched back to back: the host's time when it never waits
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(STEPS):
                step(t); t += 1
            torch.cuda.synchronize(); pipelined = (time.perf_counter() - t0) / STEPS
            print(f"## {MODEL} {L // 1024}K decode={decode}: {1e3 * statistics.median(times):.3f} ms/step synced, "
                  f"{1e3 * pipelined:.3f} ms/step pipelined", flush=True)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(STEPS):
                step(t); t += 1
            torch.cuda.synchronize()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            s2 = io.StringIO()
            pstats.Stats(prof, stream=s2).sort_stats("cumulative").print_stats(45)
            with open(f"{OUT}/cprofile_{MODEL}_{decode}.txt", "w") as f:
                f.write(s.getvalue() + "\n\n" + s2.getvalue())
            print("\n".join(s.getvalue().splitlines()[:45]))
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    step(t); t += 1
                torch.cuda.synchronize()
            ev = p.key_averages()
            kernels = sum(e.count for e in ev if e.device_type.name == "CUDA")
            print(f"CUDA kernel events per step: {kernels / 5:.0f}")
            table = ev.table(sort_by="self_cpu_time_total", row_limit=25)
            with open(f"{OUT}/torchprof_{MODEL}_{decode}.txt", "w") as f:
                f.write(table)
            p.export_chrome_trace(f"{OUT}/trace_{MODEL}_{decode}.json")
            print("\n".join(table.splitlines()[:30]), flush=True)
            cache.crop(-(t - L)); t = L


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("decode_profile.py profiles CUDA decoding steps: run it on a CUDA device")
    os.makedirs(OUT, exist_ok=True)
    main()
