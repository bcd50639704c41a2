"""What the run does when something goes wrong: Ctrl-C/SIGTERM, out of memory."""

from __future__ import annotations

import contextlib
import os
import signal

import torch
import torch.distributed as dist

from moba_train.config import RunConfig, Stage


class RunStopped(Exception):
    """A stop asked for by a signal that left the newest complete checkpoint: the command exits 0 and the
    next run of the same command resumes."""


class StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's preemption), wherever the run is.

    While deferring (the step loop and a checkpoint being written) the first signal asks for a clean stop:
    the current step ends, a checkpoint is written and `RunStopped` is raised; all ranks agree first, so
    the checkpoint's collectives run everywhere. A second Ctrl-C then aborts at once (KeyboardInterrupt,
    the previous checkpoint kept). Anywhere else (tokenizing, loading, evaluating) there is nothing to
    save that is not saved already: the first signal stops at once, as `StopNow`."""

    def __init__(self):
        self._asked = False
        self._deferring = 0
        self._previous = {}
        self._pid = os.getpid()

    @classmethod
    def install(cls) -> "StopRequest":
        req = cls()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                req._previous[sig] = signal.signal(sig, req._handle)
            except ValueError:        # not the main thread (e.g. inside some test runners)
                pass
        return req

    @contextlib.contextmanager
    def deferring(self):
        """Inside this block a first signal only asks (see `requested`)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    @contextlib.contextmanager
    def immediate(self):
        """Inside this block (an evaluation the step loop runs right after a checkpoint) a first signal stops
        at once, as outside the step loop: nothing is unsaved, and an evaluation can take minutes."""
        saved, self._deferring = self._deferring, 0
        try:
            yield
        finally:
            self._deferring = saved

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A forked process inherits the handler: it must die as usual.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not self._deferring:
            self._asked = True
            raise StopNow(signal.Signals(signum).name)
        if self._asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._asked = True
        print("\nstop requested: saving a checkpoint after this step (Ctrl-C again to abort without saving)",
              flush=True)

    @property
    def asked(self) -> bool:
        return self._asked

    def requested(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        flag = torch.tensor([1.0 if self._asked else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopNow(KeyboardInterrupt):
    """The first Ctrl-C/SIGTERM outside the step loop: stop at once (nothing unsaved is lost)."""


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def explain_oom(cfg: RunConfig, stage: Stage) -> str:
    knobs = [
        f"stages[].micro_batch_size (now {stage.micro_batch_size}; raise grad_accum to keep the batch)",
        f"model.activation_checkpointing (now {cfg.model.activation_checkpointing})",
        f"model.offload_activations (now {cfg.model.offload_activations})",
        f"deepspeed=zero3 or zero3_offload (now ZeRO-{cfg.deepspeed.zero_stage}, offload optimizer "
        f"{cfg.deepspeed.offload_optimizer}, params {cfg.deepspeed.offload_params})",
        f"parallel.sequence_parallel / stages[].sequence_parallel (now {stage.sequence_parallel})",
        f"trainer.loss_chunk_tokens (now {cfg.trainer.loss_chunk_tokens})",
        f"model.tiled_mlp_chunks (now {cfg.model.tiled_mlp_chunks})",
        "attention: MoBA in more layers, a smaller topk or block_size",
    ]
    return (f"out of memory in stage '{stage.name}' at seq_len {stage.seq_len}. Knobs that reduce memory:\n  - "
            + "\n  - ".join(knobs))
