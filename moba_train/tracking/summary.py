"""One stage's summary: what the stage_end record, the run's final table and wandb's summary show."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageSummary:
    name: str
    seq_len: int
    mode: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    tail_loss: float | None = None       # validation loss on the last positions of each sequence
    skipped_steps: int = 0
    plan: str = ""
    backends: dict = field(default_factory=dict)   # layer kind -> the backend it ran on ("moba": "triton")
    passkey: float | None = None         # passkey accuracy at the stage's end
    eval_errors: list[str] = field(default_factory=list)   # stage-end evaluations that failed, with the fix
    tflops_per_gpu: float | None = None  # achieved, over the stage's steps
    mfu: float | None = None
    data_wait_share: float | None = None
    peak_memory_gib: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Over the steps this process ran (a resumed stage's earlier steps have no timing here)."""
        timed = self.tokens - self.extra.get("tokens_before_resume", 0)
        return timed / self.seconds if self.seconds else 0.0

    def add_train_record(self, loss: float | None, tokens: int, skipped: bool) -> None:
        self.steps += 1
        self.tokens += tokens
        if skipped:
            self.skipped_steps += 1
        elif loss is not None:
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss

    def add_step(self, step) -> None:
        """A step this process just ran (moba_train.trainer.step.StepResult)."""
        self.add_train_record(None if step.skipped else step.loss, step.tokens, step.skipped)

    def record(self, outcome) -> None:
        """The stage-end evaluations (moba_train.eval.stage_end.StageEvalOutcome)."""
        if outcome.position_loss is not None:
            self.val_loss, self.tail_loss = outcome.position_loss.mean_loss, outcome.position_loss.tail_loss
        scored = [r.accuracy for r in outcome.passkey if r.accuracy is not None]
        if scored:                        # every haystack style runs the same trials: their mean is over all
            self.passkey = sum(scored) / len(scored)
        self.eval_errors = [str(e) for e in outcome.errors]
