"""Process groups: world = data-parallel x sequence-parallel, sequence-parallel ranks adjacent.

Ranks [k*sp, (k+1)*sp) form sequence-parallel group k, so with sp <= GPUs per node the all-to-alls
stay inside a node; the data-parallel index of a rank is rank // sp.

ZeRO keeps partitioning over the whole world whatever sp is: every rank holds distinct tokens,
so gradients are averaged over all dp x sp ranks (DeepSpeed's "sequence data parallel" group is
the world). That is why moba-train does not hand DeepSpeed an mpu: with the engine's group fixed
at the world, a stage can change sp without rebuilding the engine or resharding its state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

_GROUPS: dict[int, object] = {}     # sp -> this rank's sequence-parallel group (new_group is collective)


@dataclass(frozen=True)
class Layout:
    world: int
    sp: int
    rank: int

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp


def layout(sp: int) -> Layout:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if sp < 1 or world % sp:
        raise ValueError(f"sequence_parallel={sp} must divide the number of processes ({world}); "
                         f"launch a multiple of {sp} processes or change the stage's sequence_parallel")
    return Layout(world, sp, rank)


def sequence_parallel_group(sp: int):
    """This rank's group of `sp` adjacent ranks. Every rank must call this with the same sp (collective)."""
    if sp not in _GROUPS:
        lay = layout(sp)
        mine = None
        for first in range(0, lay.world, sp):
            group = dist.new_group(list(range(first, first + sp)))
            if first <= lay.rank < first + sp:
                mine = group
        _GROUPS[sp] = mine
    return _GROUPS[sp]
