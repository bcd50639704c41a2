"""Console output of a run (rank 0): a progress bar per stage and summary tables."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from moba_train.tracking.summary import StageSummary


class StageProgress:
    """tqdm bar: stage, step, loss, tokens/s, ETA (tqdm's own, from the step rate)."""

    def __init__(self, stage: str, total_steps: int, done_steps: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=done_steps, desc=f"[{stage}]", unit="step", disable=not enabled,
                        dynamic_ncols=True, file=sys.stdout, mininterval=0.5)
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int, loss: float, lr: float, plan_changed: str | None = None) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {self.tokens / max(elapsed, 1e-9):,.0f} tok/s")
        self.bar.update(1)
        if plan_changed:
            self.bar.write(f"  attention plan -> {plan_changed}")

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[StageSummary]) -> str:
    head = ["stage", "mode", "seq", "steps", "tokens", "tok/s", "TFLOP/s/GPU", "MFU", "data wait", "peak mem GiB",
            "loss first->last", "val loss", "tail loss", "passkey", "skipped", "backends"]
    body = []
    for r in rows:
        loss = (f"{r.first_loss:.4f} -> {r.last_loss:.4f}" if r.first_loss is not None and r.last_loss is not None else "-")
        body.append([r.name, r.mode, str(r.seq_len), str(r.steps), f"{r.tokens:,}", f"{r.tokens_per_s:,.0f}",
                     _fmt(r.tflops_per_gpu, ".3g"), _fmt(r.mfu, ".1%"), _fmt(r.data_wait_share, ".1%"),
                     _fmt(r.peak_memory_gib, ".2f"), loss, _fmt(r.val_loss, ".4f"), _fmt(r.tail_loss, ".4f"),
                     _fmt(r.passkey, ".0%") if not any(e.startswith("passkey") for e in r.eval_errors) else "failed",
                     str(r.skipped_steps), ", ".join(f"{k} {v.split(' ')[0]}" for k, v in r.backends.items()) or "-"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])
