"""Backends of the MoBA operator, by name. `auto` picks the fastest one that can run on the device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable                        # fn(q, k, v, layout, *, topk, softmax_scale) -> out
    devices: tuple[str, ...]            # device types it runs on ("cpu", "cuda")
    auto_rank: int | None               # higher wins under backend="auto"; None: only by name
    missing: Callable[[], str | None] = lambda: None  # why it cannot run in this install, with the fix
    summary: str = ""
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    if name == "auto":
        usable = [b for b in BACKENDS.values()
                  if b.auto_rank is not None and device.type in b.devices and b.missing() is None
                  and (dtype is None or dtype in b.dtypes)]
        if not usable:
            raise RuntimeError(f"no MoBA backend can run on {device} with {dtype}; registered: {sorted(BACKENDS)}")
        best = max(usable, key=lambda b: b.auto_rank)
        log.debug("moba_attn_varlen backend=auto picked %r on %s", best.name, device)
        return best
    if name not in BACKENDS:
        raise ValueError(f"unknown MoBA backend {name!r}; choose one of {['auto', *sorted(BACKENDS)]}")
    backend = BACKENDS[name]
    if device.type not in backend.devices:
        raise RuntimeError(f"MoBA backend {name!r} runs on {'/'.join(backend.devices)}, not {device.type}; "
                           f"move the tensors or use backend='auto'")
    reason = backend.missing()
    if reason is not None:
        raise RuntimeError(f"MoBA backend {name!r} is unavailable: {reason}")
    if dtype is not None and dtype not in backend.dtypes:
        others = sorted(b.name for b in BACKENDS.values() if dtype in b.dtypes and device.type in b.devices)
        raise RuntimeError(f"MoBA backend {name!r} takes {[str(d) for d in backend.dtypes]}, not {dtype}; "
                           f"use one of {others} or backend='auto'")
    return backend
