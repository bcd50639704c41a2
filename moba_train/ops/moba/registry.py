"""Backends of the MoBA operator, by name. `auto` picks the fastest one that can run on the device."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


def module_installed(name: str) -> bool:
    """Whether `name` (e.g. "flash_attn.flash_attn_interface") can be found, without importing it. A dotted name
    is needed where two packages share a namespace: flash-attn-4 installs `flash_attn.cute` alone, so a bare
    `flash_attn` is found with no flash-attn 2 in it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:                     # a parent package is missing
        return False


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable                        # fn(q, k, v, layout, *, topk, softmax_scale) -> out
    devices: tuple[str, ...]            # device types it runs on ("cpu", "cuda")
    auto_rank: int | None               # higher wins under backend="auto"; None: only by name
    missing: Callable[[], str | None] = lambda: None  # why it cannot run in this install, with the fix
    summary: str = ""
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    max_head_dim: int | None = None     # the largest head_dim its kernels take (None: any)
    head_dims: tuple[int, ...] | None = None  # the only head_dims its kernels take (None: any up to max_head_dim)

    def takes_head_dim(self, head_dim: int | None) -> bool:
        if head_dim is None:
            return True
        if self.head_dims is not None and head_dim not in self.head_dims:
            return False
        return self.max_head_dim is None or head_dim <= self.max_head_dim

    def head_dim_rule(self) -> str:
        """What `takes_head_dim` accepts, for error messages: "head_dim <= 256", "head_dim in (128,)"."""
        rules = ([f"head_dim in {self.head_dims}"] if self.head_dims is not None else []) + \
                ([f"head_dim <= {self.max_head_dim}"] if self.max_head_dim is not None else [])
        return " and ".join(rules) or "any head_dim"


class BackendRegistry(dict):
    """Backends of one operator by name; `resolve` picks one for a device and dtype, or says why it can't."""

    def __init__(self, kind: str, logger: logging.Logger):
        super().__init__()
        self.kind = kind            # names the operator in messages: "MoBA", "full-attention"
        self.log = logger           # the operator's own logger carries the debug line of `auto`

    def register(self, backend: Backend) -> None:
        self[backend.name] = backend

    def resolve(self, name: str, device: torch.device, dtype: torch.dtype | None = None,
                head_dim: int | None = None) -> Backend:
        """The backend `name` names, or under "auto" the fastest that can run this device, dtype and head_dim."""
        if name == "auto":
            usable = [b for b in self.values()
                      if b.auto_rank is not None and device.type in b.devices and b.missing() is None
                      and (dtype is None or dtype in b.dtypes) and b.takes_head_dim(head_dim)]
            if not usable:
                raise RuntimeError(f"no {self.kind} backend can run on {device} with {dtype} and head_dim {head_dim}; "
                                   f"registered: {sorted(self)}")
            best = max(usable, key=lambda b: b.auto_rank)
            self.log.debug("%s backend=auto picked %r on %s", self.kind, best.name, device)
            return best
        if name not in self:
            raise ValueError(f"unknown {self.kind} backend {name!r}; choose one of {['auto', *sorted(self)]}")
        backend = self[name]
        reason = backend.missing()
        if reason is not None:
            raise RuntimeError(f"{self.kind} backend {name!r} is unavailable: {reason}")
        if device.type not in backend.devices:
            raise RuntimeError(f"{self.kind} backend {name!r} runs on {'/'.join(backend.devices)}, not {device.type}; "
                               f"move the tensors or use backend='auto'")
        if not backend.takes_head_dim(head_dim):
            others = sorted(b.name for b in self.values() if b.takes_head_dim(head_dim) and device.type in b.devices)
            raise RuntimeError(f"{self.kind} backend {name!r} takes {backend.head_dim_rule()}, not {head_dim}; "
                               f"use one of {others} or backend='auto'")
        if dtype is not None and dtype not in backend.dtypes:
            others = sorted(b.name for b in self.values() if dtype in b.dtypes and device.type in b.devices)
            raise RuntimeError(f"{self.kind} backend {name!r} takes {[str(d) for d in backend.dtypes]}, not {dtype}; "
                               f"use one of {others} or backend='auto'")
        return backend


BACKENDS = BackendRegistry("MoBA", log)
register = BACKENDS.register
resolve = BACKENDS.resolve
