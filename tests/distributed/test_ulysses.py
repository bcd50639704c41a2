"""Ulysses with sp=2 on two gloo processes equals one process: MoBA and full, GQA, KV replication,
a document crossing the shard boundary, two rows per micro-batch."""

from pathlib import Path

import pytest

from moba_train.distributed.ulysses import kv_replication, shard_batch
from tests.distributed.launch import torchrun

import torch


@pytest.mark.timeout(300)
def test_sp2_attention_equals_single_process():
    res = torchrun(Path(__file__).with_name("ulysses_worker.py"), 2)
    assert res.stdout.count("all equal") == 2, res.stdout


@pytest.mark.parametrize("sp,hq,hkv,repeat", [(2, 8, 2, 1), (4, 8, 2, 2), (8, 32, 8, 1), (8, 8, 2, 4), (2, 12, 3, 2),
                                              (4, 12, 6, 2)],
                         ids=["sp2-8/2", "sp4-8/2-replicate2", "sp8-32/8", "sp8-8/2-replicate4", "sp2-12/3-replicate2",
                              "sp4-12/6-replicate2"])
def test_kv_heads_are_replicated_just_enough(sp, hq, hkv, repeat):
    assert kv_replication(sp, hq, hkv) == repeat


def test_sp_must_divide_query_heads_and_the_error_lists_what_works():
    with pytest.raises(ValueError, match=r"must divide the 9 query heads; use one of \[1, 3, 9\]"):
        kv_replication(2, 9, 3)


def test_shard_batch_keeps_global_boundaries():
    batch = {"input_ids": torch.arange(16).view(2, 8), "position_ids": torch.arange(16).view(2, 8),
             "shift_labels": torch.arange(16).view(2, 8), "cu_seqlens": torch.tensor([0, 5, 16], dtype=torch.int32),
             "max_seqlen": 11}
    shard = shard_batch(batch, 1, 2)
    assert shard["input_ids"].tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert shard["cu_seqlens"] is batch["cu_seqlens"] and shard["max_seqlen"] == 11
