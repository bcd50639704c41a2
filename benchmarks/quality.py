"""MoBA against full attention on real data: the same model, tokens and seed, three attention arms.

Each arm is one ordinary training run of `recipes/quality_code.yaml` (a ~78M Llama from scratch at 8K on
Python code, then extended to 32K with passkey retrieval in code), differing only in its attention group:

    full     attention=full             full causal attention
    moba     attention=moba             MoBA, block 512, top-3 (the paper's scaling-law setting)
    hybrid   attention=moba_then_full   MoBA for 90% of each stage's tokens, then full (the paper's 90/10)

    python benchmarks/quality.py --out runs/quality                    # the three arms, one after the other
    python benchmarks/quality.py --out runs/quality --parallel         # all at once (one GPU holds all three)
    python benchmarks/quality.py --out runs/quality -- stages.0.tokens=4000000   # any trainer override
    python benchmarks/quality.py --report runs/quality --plots docs    # the table and plots of finished runs

Every arm's `metrics.jsonl` holds its stage-end evaluations (held-out loss, trailing-token loss, loss by
position, passkey); the report compares them with the full-attention arm: relative difference of the
validation loss and of the trailing-token loss (the last 2,048 positions, where long context matters).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moba_train.eval.plots import pyplot, save_figure  # noqa: E402

ARMS = {"full": "full", "moba": "moba", "hybrid": "moba_then_full"}   # arm -> attention config group
COLOURS = {"full": "black", "moba": "tab:orange", "hybrid": "tab:blue"}
RECIPE = "quality_code"


def train_command(arm: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "moba_train", f"recipe={RECIPE}", f"attention={ARMS[arm]}",
            f"paths.output_dir={out / arm}", f"run_name={RECIPE}_{arm}", *extra]


def run_arms(arms: list[str], out: Path, extra: list[str], parallel: bool) -> dict[str, int]:
    """Train every arm; its console goes to <out>/<arm>.log. Returns each arm's exit code."""
    out.mkdir(parents=True, exist_ok=True)
    codes, running = {}, {}
    for arm in arms:
        cmd = train_command(arm, out, extra)
        print(f"[quality] {arm}: {' '.join(cmd)}", flush=True)
        log = open(out / f"{arm}.log", "w")
        running[arm] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time())
        if not parallel:
            codes[arm] = _finish(arm, *running.pop(arm))
    for arm, (proc, log, t0) in running.items():
        codes[arm] = _finish(arm, proc, log, t0)
    return codes


def _finish(arm: str, proc: subprocess.Popen, log, t0: float) -> int:
    code = proc.wait()
    log.close()
    print(f"[quality] {arm}: exit {code} after {time.time() - t0:.0f} s", flush=True)
    return code


def read_arm(run_dir: Path) -> dict | None:
    """Per stage: the last eval, passkey and stage_end records, and the training losses with their tokens."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    stages: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        name = r.get("stage") or r.get("name")
        if name is None:
            continue
        stage = stages.setdefault(name, {"train": []})
        if r["kind"] == "train" and r.get("loss") is not None:
            stage["train"].append((r["step"], r["tokens"], r["loss"]))
        elif r["kind"] in ("eval", "passkey", "stage_end"):
            stage[r["kind"]] = r
    return stages


def summarize(runs: dict[str, dict]) -> list[dict]:
    """One row per (stage, arm) with the differences against the full-attention arm of that stage."""
    rows = []
    for stage in next(iter(runs.values())):
        base = runs.get("full", {}).get(stage, {}).get("eval")
        for arm, stages in runs.items():
            s = stages.get(stage, {})
            ev, pk, end = s.get("eval"), s.get("passkey"), s.get("stage_end")
            if ev is None:
                continue
            row = {"stage": stage, "arm": arm, "seq_len": ev["seq_len"], "val_loss": ev["mean_loss"],
                   "tail_loss": ev["tail_loss"], "tail_window": ev["tail_window"], "eval_tokens": ev["tokens"],
                   "passkey": pk["accuracy"] if pk else None,
                   "train_tokens": end["tokens"] if end else None, "seconds": end["seconds"] if end else None}
            if base is not None:
                row["val_vs_full"] = _relative(ev["mean_loss"], base["mean_loss"])
                row["tail_vs_full"] = _relative(ev["tail_loss"], base["tail_loss"])
            rows.append(row)
    return rows


def _relative(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value / base - 1


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def table(rows: list[dict]) -> str:
    out = ["| stage | arm | val loss | vs full | tail loss (last N) | vs full | passkey | train tokens | s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        passkey = "" if r["passkey"] is None else f"{r['passkey']:.0%}"
        out.append(f"| {r['stage']} ({r['seq_len']:,}) | {r['arm']} | {_num(r['val_loss'])} | {_pct(r.get('val_vs_full'))} "
                   f"| {_num(r['tail_loss'])} ({r['tail_window'] or 0:,}) | {_pct(r.get('tail_vs_full'))} | {passkey} "
                   f"| {r['train_tokens'] or 0:,} | {r['seconds'] or 0:.0f} |")
    return "\n".join(out)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.2%}"


def plot(runs: dict[str, dict], plots_dir: Path) -> list[Path]:
    """quality_loss_by_position.png (one panel per stage) and quality_training_loss.png (loss by tokens)."""
    plt = pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    stage_names = list(next(iter(runs.values())))
    # top: loss by position per arm; bottom: each arm minus full attention, where the arms differ
    fig, axes = plt.subplots(2, len(stage_names), figsize=(6 * len(stage_names), 7), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    for col, stage in enumerate(stage_names):
        top, bottom = axes[0][col], axes[1][col]
        base = runs.get("full", {}).get(stage, {}).get("eval")
        for arm, stages in runs.items():
            ev = stages.get(stage, {}).get("eval")
            if ev is None:
                continue
            edges = ev["bucket_edges"]
            mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            pts = [(m, v) for m, v in zip(mids, ev["bucket_loss"]) if v is not None]
            top.plot(*zip(*pts), marker="o", markersize=3, color=COLOURS.get(arm), label=f"{arm} ({ev['mean_loss']:.3f})")
            if base is not None and arm != "full":
                diff = [(m, v - b) for m, v, b in zip(mids, ev["bucket_loss"], base["bucket_loss"])
                        if v is not None and b is not None]
                bottom.plot(*zip(*diff), marker="o", markersize=3, color=COLOURS.get(arm), label=arm)
        top.set_title(f"held-out loss by position, stage {stage}")
        top.set_ylabel("loss")
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        bottom.axhline(0, color="black", linewidth=0.8)
        bottom.set_xlabel("token position")
        bottom.set_ylabel("loss minus full attention's")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
    paths = [save_figure(fig, plots_dir / "quality_loss_by_position.png")]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, stages in runs.items():
        seen, xs, ys = 0, [], []
        for stage in stage_names:
            for _, tokens, loss in stages.get(stage, {}).get("train", []):
                seen += tokens
                xs.append(seen / 1e6)
                ys.append(loss)
        ax.plot(xs, _ema(ys, 0.9), color=COLOURS.get(arm), label=arm, linewidth=1.2)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("training loss (EMA 0.9)")
    ax.set_yscale("log")
    ax.set_title("training loss, all stages")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    paths.append(save_figure(fig, plots_dir / "quality_training_loss.png"))
    return paths


def _ema(values: list[float], decay: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def report(out: Path, arms: list[str], plots_dir: Path | None) -> list[dict]:
    runs = {arm: read for arm in arms if (read := read_arm(out / arm))}
    if not runs:
        raise SystemExit(f"no finished arm under {out} (looked for <arm>/metrics.jsonl for {arms})")
    rows = summarize(runs)
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if plots_dir is not None:
        try:
            for path in plot(runs, plots_dir):
                print(f"[quality] wrote {path}")
        except ImportError:
            print("[quality] matplotlib is not installed: no plots (pip install matplotlib, then --report)")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="train the arms into OUT/<arm>, then report")
    p.add_argument("--report", type=Path, help="only report the finished arms under this directory")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--parallel", action="store_true", help="run the arms at the same time (same device)")
    p.add_argument("--plots", type=Path, help="where the PNGs go (default: the runs directory)")
    p.add_argument("overrides", nargs="*", help="trainer overrides after --, passed to every arm")
    args = p.parse_args()
    if (args.out is None) == (args.report is None):
        p.error("give --out DIR (train and report) or --report DIR (report only)")
    root = args.out or args.report
    if args.out is not None:
        codes = run_arms(args.arms, args.out, args.overrides, args.parallel)
        failed = [a for a, c in codes.items() if c != 0]
        if failed:
            print(f"[quality] arms {failed} failed; their logs: {[str(root / f'{a}.log') for a in failed]}")
    report(root, args.arms, args.plots or root)


if __name__ == "__main__":
    main()
