"""MoBA against full attention on real data: the same model, tokens and seed, several attention arms.

Each arm is one ordinary training run of a study's recipe, differing only in its attention group:

  --recipe smollm2_moba   SmolLM2-135M-Instruct continued at 8K, then extended to 32K (recipes/smollm2_moba.yaml)
      full         attention=full              full causal attention: the control
      moba         attention=moba              MoBA in every layer, block 512, top-3
      last3_full   attention=moba_last3_full   MoBA but the last 3 layers full (the paper's layer-wise hybrid)
      fine_gate    attention=moba_fine_gate    MoBA in every layer, block 128, top-12 (the same 1,536 keys, finer)
  --recipe quality_code   a ~78M Llama from scratch on Python code, 8K then 32K (recipes/quality_code.yaml)
      full, moba, hybrid (attention=moba_then_full: MoBA for 90% of each stage's tokens, then full)

    python benchmarks/quality.py --recipe smollm2_moba --out runs/smollm2 --parallel --baselines
    python benchmarks/quality.py --out runs/quality -- stages.0.tokens=4000000     # any trainer override
    python benchmarks/quality.py --recipe smollm2_moba --report runs/smollm2 --plots docs/images

`--baselines` also evaluates each arm's untrained model (`moba-train mode=eval checkpoint=base`: the model as
released, its own RoPE, the arm's attention) at every stage's length, into <out>/<arm>-untrained/.

Every arm's `metrics.jsonl` holds its evaluations: part-way ones (the recipe's `eval_at`, e.g. before the
first step and after 10% of a stage) and stage-end ones (held-out loss, trailing-token loss, loss by position,
passkey on each haystack). The report compares each arm with the full-attention arm: at every stage end the
validation loss, the trailing-token loss and the loss in the last position bucket (relative), and passkey
accuracy by length; along the way, passkey accuracy against the tokens trained, and the first evaluation at
which each arm's accuracy reached the full arm's. It writes <out>/quality.json, prints markdown tables and
draws quality_passkey_by_tokens.png, quality_loss_by_position.png and quality_training_loss.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moba_train.eval.plots import pyplot, save_figure  # noqa: E402

STUDIES = {   # recipe -> arm -> attention config group
    "smollm2_moba": {"full": "full", "moba": "moba", "last3_full": "moba_last3_full", "fine_gate": "moba_fine_gate"},
    "quality_code": {"full": "full", "moba": "moba", "hybrid": "moba_then_full"},
}
COLOURS = {"full": "black", "moba": "tab:orange", "hybrid": "tab:blue", "last3_full": "tab:blue",
           "fine_gate": "tab:green"}
# The targets of a study (issue 19): at every stage end each MoBA arm's passkey accuracy is at least the full
# arm's at every length, its validation loss within 1%, and at the last stage's end its loss in the last
# position bucket within 1%.
LOSS_TOLERANCE = 0.01


def train_command(recipe: str, arm: str, group: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "moba_train", f"recipe={recipe}", f"attention={group}",
            f"paths.output_dir={out / arm}", f"run_name={recipe}_{arm}", *extra]


def baseline_command(recipe: str, arm: str, group: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "moba_train", "mode=eval", "checkpoint=base", f"recipe={recipe}",
            f"attention={group}", f"paths.output_dir={out / f'{arm}-untrained'}", *extra]


def run_all(commands: dict[str, list[str]], out: Path, parallel: bool) -> dict[str, int]:
    """Run each named command (its console in <out>/<name>.log), in parallel or one after the other."""
    out.mkdir(parents=True, exist_ok=True)
    codes, running = {}, {}
    for name, cmd in commands.items():
        print(f"[quality] {name}: {' '.join(cmd)}", flush=True)
        log = open(out / f"{name}.log", "w")
        running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time())
        if not parallel:
            codes[name] = _finish(name, *running.pop(name))
    for name, (proc, log, t0) in running.items():
        codes[name] = _finish(name, proc, log, t0)
    return codes


def _finish(name: str, proc: subprocess.Popen, log, t0: float) -> int:
    code = proc.wait()
    log.close()
    print(f"[quality] {name}: exit {code} after {time.time() - t0:.0f} s", flush=True)
    return code


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Point:
    """One evaluation of an arm: a stage's part-way one (part_way = its index) or its end (part_way None)."""

    stage: str
    stage_index: int
    part_way: int | None
    tokens_seen: int | None
    stage_step: int | None = None
    eval: dict | None = None
    passkey: dict[str, dict] = field(default_factory=dict)    # haystack -> passkey record

    @property
    def label(self) -> str:
        return f"{self.stage} end" if self.part_way is None else f"{self.stage} after step {self.stage_step}"

    def passkey_accuracy(self) -> float | None:
        """Over every trial of every haystack (each runs the same lengths, depths and samples)."""
        scores = [r["accuracy"] for r in self.passkey.values() if r.get("accuracy") is not None]
        return sum(scores) / len(scores) if scores else None

    def passkey_by_length(self) -> dict[int, float]:
        """Accuracy at each haystack length, pooled over depths and haystacks."""
        pooled: dict[int, list[float]] = {}
        for r in self.passkey.values():
            for row in r["accuracy_grid"]:
                for length, acc in zip(r["lengths"], row):
                    if acc is not None:
                        pooled.setdefault(length, []).append(acc)
        return {n: sum(v) / len(v) for n, v in sorted(pooled.items())}


@dataclass
class Arm:
    name: str
    points: list[Point]                                   # in the order they were evaluated
    train: list[tuple[int, int, float]]                   # (step, tokens, loss)
    stage_ends: dict[str, dict]                           # stage -> stage_end record
    untrained: Point | None = None                        # mode=eval checkpoint=base, every stage's length

    def end(self, stage: str) -> Point | None:
        return next((p for p in self.points if p.stage == stage and p.part_way is None), None)


def _points(records: list[dict]) -> list[Point]:
    points: dict[tuple, Point] = {}
    for r in records:
        if r.get("kind") not in ("eval", "passkey"):
            continue
        key = (r.get("stage_index"), r.get("part_way"))
        point = points.setdefault(key, Point(r.get("stage", "eval"), r.get("stage_index") or 0, r.get("part_way"),
                                             r.get("tokens_seen"), r.get("stage_step")))
        if r["kind"] == "eval":
            point.eval = r
        else:
            point.passkey[r.get("haystack", "lee")] = r
    return list(points.values())


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_arm(out: Path, name: str) -> Arm | None:
    records = read_records(out / name / "metrics.jsonl")
    if not records:
        return None
    train = [(r["step"], r["tokens"], r["loss"]) for r in records if r["kind"] == "train" and r.get("loss") is not None]
    ends = {r["name"]: r for r in records if r["kind"] == "stage_end"}
    untrained = read_records(out / f"{name}-untrained" / "eval" / "metrics.jsonl")
    base = None
    if untrained:
        # mode=eval writes one eval record per stage (at its length) and the passkey over every length
        base = Point("untrained", -1, None, 0, 0, None,
                     {r.get("haystack", "lee"): r for r in untrained if r["kind"] == "passkey"})
        base.eval = {r["stage"]: r for r in untrained if r["kind"] == "eval"}
    return Arm(name, _points(records), train, ends, base)


# ------------------------------------------------------------------------------------------------ report
def _relative(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value / base - 1


def _last_bucket(ev: dict | None) -> float | None:
    losses = [v for v in (ev or {}).get("bucket_loss", []) if v is not None]
    return losses[-1] if losses else None


def stage_end_rows(arms: dict[str, Arm]) -> list[dict]:
    """One row per (stage, arm) at the stage's end, with the differences against the full arm and the targets."""
    full = arms.get("full")
    stages = [p.stage for p in next(iter(arms.values())).points if p.part_way is None]
    rows = []
    for i, stage in enumerate(stages):
        last_stage = i == len(stages) - 1
        ref = full.end(stage) if full else None
        for arm in arms.values():
            point = arm.end(stage)
            if point is None or point.eval is None:
                continue
            ev, end = point.eval, arm.stage_ends.get(stage, {})
            row = {"stage": stage, "arm": arm.name, "seq_len": ev["seq_len"], "val_loss": ev["mean_loss"],
                   "tail_loss": ev["tail_loss"], "tail_window": ev["tail_window"], "last_bucket": _last_bucket(ev),
                   "passkey": point.passkey_accuracy(), "passkey_by_length": point.passkey_by_length(),
                   "train_tokens": end.get("tokens"), "seconds": end.get("seconds"), "finished": bool(end)}
            if ref is not None and ref.eval is not None and arm.name != "full":
                row["val_vs_full"] = _relative(ev["mean_loss"], ref.eval["mean_loss"])
                row["tail_vs_full"] = _relative(ev["tail_loss"], ref.eval["tail_loss"])
                row["last_bucket_vs_full"] = _relative(row["last_bucket"], _last_bucket(ref.eval))
                mine, theirs = row["passkey_by_length"], ref.passkey_by_length()
                # None: not measured (a run stopped during its stage-end evaluations), neither met nor missed
                checks = {"passkey >= full at every length": all(mine.get(n, -1) >= a for n, a in theirs.items())
                          if mine else None,
                          "val loss within 1%": row["val_vs_full"] is not None and row["val_vs_full"] <= LOSS_TOLERANCE}
                if last_stage:
                    checks["last-bucket loss within 1%"] = (row["last_bucket_vs_full"] is not None
                                                            and row["last_bucket_vs_full"] <= LOSS_TOLERANCE)
                row["targets"] = checks
            rows.append(row)
    return rows


def recovery(arms: dict[str, Arm]) -> dict[str, dict]:
    """Per arm: its passkey accuracy at every evaluation, and the tokens trained at the first evaluation where it
    reached the full arm's accuracy at the same evaluation. Evaluations where the full arm retrieves nothing do not
    count: `comparable` is False when there is none, and the check cannot tell the arms apart."""
    full = arms.get("full")
    out = {}
    for arm in arms.values():
        series = [(p.label, p.tokens_seen, p.passkey_accuracy()) for p in arm.points if p.passkey]
        reached, comparable = None, False
        if full is not None and arm.name != "full":
            for p in arm.points:
                twin = next((q for q in full.points if (q.stage_index, q.part_way) == (p.stage_index, p.part_way)),
                            None)
                mine, theirs = p.passkey_accuracy(), twin.passkey_accuracy() if twin else None
                if mine is None or not theirs:
                    continue
                comparable = True
                if mine >= theirs:
                    reached = p.tokens_seen
                    break
        out[arm.name] = {"reached_full_at_tokens": reached, "comparable": comparable, "series": series}
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.2%}"


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def _count(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _verdict(targets: dict[str, bool | None]) -> str:
    if all(ok is True for ok in targets.values()):
        return "**met**"
    missed = [k for k, ok in targets.items() if ok is False]
    unmeasured = [k for k, ok in targets.items() if ok is None]
    return "; ".join(filter(None, ["missed: " + "; ".join(missed) if missed else "",
                                   "not measured: " + "; ".join(unmeasured) if unmeasured else ""]))


def stage_end_table(rows: list[dict]) -> str:
    out = ["| stage | arm | val loss | vs full | tail loss (last N) | vs full | last bucket vs full | passkey by length "
           "| targets | train tokens | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by_length = ", ".join(f"{_tokens(n)} {_acc(a)}" for n, a in r["passkey_by_length"].items()) or "-"
        targets = r.get("targets")
        verdict = "" if targets is None else _verdict(targets)
        if not r["finished"]:
            verdict = "; ".join(filter(None, [verdict, "stage end not recorded (the run stopped in its evaluations)"]))
        out.append(f"| {r['stage']} ({r['seq_len']:,}) | {r['arm']} | {_num(r['val_loss'])} | {_pct(r.get('val_vs_full'))} "
                   f"| {_num(r['tail_loss'])} ({r['tail_window'] or 0:,}) | {_pct(r.get('tail_vs_full'))} "
                   f"| {_pct(r.get('last_bucket_vs_full'))} | {by_length} | {verdict} | {_count(r['train_tokens'])} "
                   f"| {_count(r['seconds'])} |")
    return "\n".join(out)


def recovery_table(arms: dict[str, Arm], found: dict[str, dict]) -> str:
    names = list(arms)
    head = ["| evaluation | " + " | ".join(f"{n} passkey" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    labels = []
    for arm in arms.values():
        for label, _, _ in found[arm.name]["series"]:
            if label not in labels:
                labels.append(label)
    rows = []
    if any(a.untrained for a in arms.values()):
        rows.append("| untrained, every length | " + " | ".join(
            ", ".join(f"{_tokens(n)} {_acc(v)}" for n, v in a.untrained.passkey_by_length().items()) or "-"
            if a.untrained else "-" for a in arms.values()) + " |")
    for label in labels:
        cells = [next((_acc(acc) for lab, _, acc in found[n]["series"] if lab == label), "-") for n in names]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    reached = []
    for name, v in found.items():
        if name != "full":
            at = v["reached_full_at_tokens"]
            reached.append(f"{name} " + ("n/a (the full arm retrieved no key at any evaluation)" if not v["comparable"]
                                         else "never" if at is None else f"after {at:,} training tokens"))
    tail = ["", "Reached the full arm's passkey accuracy at the same evaluation: " + "; ".join(reached)]
    return "\n".join(head + rows + tail)


# ------------------------------------------------------------------------------------------------ plots
def plot(arms: dict[str, Arm], plots_dir: Path) -> list[Path]:
    plt = pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    haystacks = sorted({h for a in arms.values() for p in a.points for h in p.passkey})
    if haystacks:
        fig, axes = plt.subplots(1, len(haystacks), figsize=(6.5 * len(haystacks), 4.5), squeeze=False, sharey=True)
        for ax, haystack in zip(axes[0], haystacks):
            for arm in arms.values():
                pts = [(p.tokens_seen, p.passkey[haystack]["accuracy"]) for p in arm.points
                       if haystack in p.passkey and p.tokens_seen is not None
                       and p.passkey[haystack].get("accuracy") is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=4, color=COLOURS.get(arm.name), label=arm.name)
            ends = [(p.stage, p.tokens_seen) for p in next(iter(arms.values())).points if p.part_way is None]
            for stage, tokens in ends[:-1]:
                ax.axvline(tokens or 0, color="grey", linestyle=":", linewidth=0.8)
                ax.text(tokens or 0, 1.02, f" {stage} ends", fontsize=8, color="grey", va="bottom")
            ax.set_title(f"passkey retrieval, {haystack} haystack")
            ax.set_xlabel("training tokens")
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:,.1f}M" if x >= 1e6 else f"{x:,.0f}")
            ax.set_ylim(-0.03, 1.08)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("accuracy (every length and depth)")
        paths.append(save_figure(fig, plots_dir / "quality_passkey_by_tokens.png"))

    stages = [p.stage for p in next(iter(arms.values())).points if p.part_way is None]
    # top: loss by position per arm at each stage's end; bottom: each arm minus full attention
    fig, axes = plt.subplots(2, len(stages), figsize=(6 * len(stages), 7), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 2]})
    full = arms.get("full")
    for col, stage in enumerate(stages):
        top, bottom = axes[0][col], axes[1][col]
        ref = full.end(stage).eval if full and full.end(stage) else None
        for arm in arms.values():
            point = arm.end(stage)
            ev = point.eval if point else None
            if ev is None:
                continue
            edges = ev["bucket_edges"]
            mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            pts = [(m, v) for m, v in zip(mids, ev["bucket_loss"]) if v is not None]
            top.plot(*zip(*pts), marker="o", markersize=3, color=COLOURS.get(arm.name),
                     label=f"{arm.name} ({ev['mean_loss']:.3f})")
            if ref is not None and arm.name != "full":
                diff = [(m, v - b) for m, v, b in zip(mids, ev["bucket_loss"], ref["bucket_loss"])
                        if v is not None and b is not None]
                if diff:
                    bottom.plot(*zip(*diff), marker="o", markersize=3, color=COLOURS.get(arm.name), label=arm.name)
        top.set_title(f"held-out loss by position, end of {stage}")
        top.set_ylabel("loss")
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        bottom.axhline(0, color="black", linewidth=0.8)
        bottom.set_xlabel("token position")
        bottom.set_ylabel("loss minus full attention's")
        bottom.grid(alpha=0.3)
        if bottom.lines[1:]:
            bottom.legend(fontsize=8)
    paths.append(save_figure(fig, plots_dir / "quality_loss_by_position.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in arms.values():
        seen, xs = 0, []
        for _, tokens, _ in arm.train:
            seen += tokens
            xs.append(seen / 1e6)
        ax.plot(xs, _ema([loss for _, _, loss in arm.train], 0.9), color=COLOURS.get(arm.name), label=arm.name,
                linewidth=1.2)
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


def report(out: Path, arms: list[str], plots_dir: Path | None) -> dict:
    read = {name: arm for name in arms if (arm := read_arm(out, name))}
    if not read:
        raise SystemExit(f"no arm under {out} (looked for <arm>/metrics.jsonl for {arms})")
    rows, found = stage_end_rows(read), recovery(read)
    result = {"stage_ends": rows, "recovery": found}
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    print(stage_end_table(rows))
    print()
    print(recovery_table(read, found))
    if plots_dir is not None:
        for path in plot(read, plots_dir):
            print(f"[quality] wrote {path}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="quality_code", choices=list(STUDIES))
    p.add_argument("--out", type=Path, help="train the arms into OUT/<arm>, then report")
    p.add_argument("--report", type=Path, help="only report the arms under this directory")
    p.add_argument("--arms", nargs="*", help="a subset of the study's arms (default: all)")
    p.add_argument("--parallel", action="store_true", help="run the arms at the same time (same device)")
    p.add_argument("--baselines", action="store_true",
                   help="also evaluate each arm's untrained model at every stage's length (mode=eval checkpoint=base)")
    p.add_argument("--plots", type=Path, help="where the PNGs go (default: the runs directory)")
    p.add_argument("overrides", nargs="*", help="overrides after --, passed to every arm (and baseline)")
    args = p.parse_args(argv)
    study = STUDIES[args.recipe]
    arms = args.arms or list(study)
    unknown = sorted(set(arms) - set(study))
    if unknown:
        p.error(f"--recipe {args.recipe} has the arms {list(study)}, not {unknown}")
    if (args.out is None) == (args.report is None):
        p.error("give --out DIR (train and report) or --report DIR (report only)")
    root = args.out or args.report
    if args.out is not None:
        commands = {arm: train_command(args.recipe, arm, study[arm], root, args.overrides) for arm in arms}
        if args.baselines:
            commands.update({f"{arm}-untrained": baseline_command(args.recipe, arm, study[arm], root, args.overrides)
                             for arm in arms})
        codes = run_all(commands, root, args.parallel)
        failed = [name for name, code in codes.items() if code != 0]
        if failed:
            print(f"[quality] {failed} failed; their logs: {[str(root / f'{name}.log') for name in failed]}")
    report(root, arms, args.plots or root)


if __name__ == "__main__":
    main()
