"""The run's plots as PNG files, drawn from `metrics.jsonl` (matplotlib, Agg backend: no display needed).

  loss_by_step.png       training loss per global step, one colour per stage (dashed lines at stage starts)
  loss_by_position.png   validation loss by token position, one line per stage evaluation
  passkey_heatmap.png    passkey accuracy, depth x haystack length (the latest result per cell), a panel per haystack
  passkey_by_tokens.png  passkey accuracy against training tokens, a line per haystack (with part-way evaluations)

A plot whose records do not exist yet (e.g. no passkey trials) is not drawn.
"""

from __future__ import annotations

from pathlib import Path

PLOT_DIR = "plots"


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _stage_colours(names: list[str]) -> dict[str, object]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _in_order(records: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r.get("stage") is not None and r["stage"] not in seen:
            seen.append(r["stage"])
    return seen


def loss_by_step(records: list[dict], path: Path) -> Path | None:
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    if not train:
        return None
    plt = pyplot()
    colours = _stage_colours(_in_order(train))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stage, colour in colours.items():
        rows = [r for r in train if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 50 else None,
                markersize=3, color=colour, label=f"{stage} ({rows[0]['seq_len']:,} tokens)")
        ax.axvline(rows[0]["step"] - 0.5, color=colour, linestyle=":", linewidth=0.8)
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def loss_by_position(records: list[dict], path: Path) -> Path | None:
    evals = [r for r in records if r.get("kind") == "eval" and any(v is not None for v in r.get("bucket_loss", []))]
    if not evals:
        return None
    plt = pyplot()
    colours = _stage_colours(_in_order(evals))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in evals:
        edges, losses = r["bucket_edges"], r["bucket_loss"]
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        pts = [(m, v) for m, v in zip(mids, losses) if v is not None]
        tail = f", tail {r['tail_loss']:.3f}" if r.get("tail_loss") is not None else ""
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, color=colours[r["stage"]],
                label=f"{r['stage']} @ step {r['step']} (mean {r['mean_loss']:.3f}{tail})")
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("validation loss")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:,.0f}")
    ax.set_title("validation loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def passkey_heatmap(records: list[dict], path: Path) -> Path | None:
    cells: dict[str, dict[tuple[float, int], float]] = {}
    for r in records:                                    # later results overwrite earlier ones
        if r.get("kind") != "passkey":
            continue
        style = cells.setdefault(r.get("haystack", "lee"), {})
        for d, row in zip(r["depths"], r["accuracy_grid"]):
            for n, acc in zip(r["lengths"], row):
                if acc is not None:
                    style[(d, n)] = acc
    cells = {name: grid for name, grid in cells.items() if grid}
    if not cells:
        return None
    plt = pyplot()
    depths = sorted({d for grid in cells.values() for d, _ in grid})
    lengths = sorted({n for grid in cells.values() for _, n in grid})
    fig, axes = plt.subplots(1, len(cells), squeeze=False,
                             figsize=(len(cells) * (1.6 + 1.1 * len(lengths)), 1.4 + 0.6 * len(depths)))
    for ax, (name, grid_cells) in zip(axes[0], cells.items()):
        grid = [[grid_cells.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                ax.text(j, i, "-" if acc != acc else f"{acc:.0%}", ha="center", va="center", fontsize=9)
        ax.set_xlabel("haystack length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"passkey retrieval, {name} haystack")
    fig.colorbar(image, ax=list(axes[0]), fraction=0.05)
    return save_figure(fig, path, tight=False)


def passkey_by_tokens(records: list[dict], path: Path) -> Path | None:
    """Accuracy over all lengths and depths at each evaluation, against the tokens trained by then."""
    points: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("kind") == "passkey" and r.get("accuracy") is not None and r.get("tokens_seen") is not None:
            points.setdefault(r.get("haystack", "lee"), []).append((r["tokens_seen"], r["accuracy"]))
    if not any(len(p) > 1 for p in points.values()):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=f"{name} haystack")
    starts, trained = {}, 0                              # tokens trained before each stage's first step
    for r in records:
        if r.get("kind") == "train":
            starts.setdefault(r["stage"], trained)
            trained += r.get("tokens", 0)
    for name, at in starts.items():
        ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
        ax.text(at, 1.02, f" {name}", fontsize=8, color="grey", va="bottom")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.03, 1.08)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:,.1f}M" if x >= 1e6 else f"{x:,.0f}")
    ax.set_title("passkey retrieval during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


PLOTS = {"loss_by_step": loss_by_step, "loss_by_position": loss_by_position, "passkey_heatmap": passkey_heatmap,
         "passkey_by_tokens": passkey_by_tokens}


def write_plots(records: list[dict], out_dir: Path) -> dict[str, Path]:
    """Every plot the records allow, as <out_dir>/<name>.png; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in PLOTS.items():
        path = draw(records, out_dir / f"{name}.png")
        if path is not None:
            written[name] = path
    return written


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    plt = pyplot()
    if tight:                            # (a colorbar shared by several panels does not take tight_layout)
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
