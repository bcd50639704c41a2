"""The stream after a resume equals the uninterrupted stream, also into a different data-parallel size."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from moba_train.data import DataError, build_stage_data
from tests.data.reference import check_batch, fake_source, make_stage

SEQ = 128


def sources():
    rng = np.random.default_rng(7)
    return [fake_source("a", rng.integers(2, 300, 200), 0), fake_source("b", rng.integers(100, 500, 60), 1)]


def stage(**kw):
    defaults = dict(seq_len=SEQ, mix={"a": 0.6, "b": 0.4}, seed=3)
    return make_stage(sources(), **{**defaults, **kw})


def rows(batch) -> list[tuple]:
    """Each pack of a micro-batch as a hashable (input_ids, shift_labels) pair."""
    return [(tuple(i), tuple(l)) for i, l in zip(batch["input_ids"].tolist(), batch["shift_labels"].tolist())]


def global_packs(dp_size: int, micro: int, steps: int, state=None, **kw) -> tuple[list, dict]:
    """The packs all ranks see over `steps` micro-steps, in global order, and the state afterwards."""
    ranks = [stage(dp_rank=r, dp_size=dp_size, micro_batch_size=micro, **kw) for r in range(dp_size)]
    if state is not None:
        for r in ranks:
            r.load_state_dict(state)
    packs = []
    for _ in range(steps):
        for r in ranks:
            packs += rows(next(r))
    states = [r.state_dict() for r in ranks]
    assert all(s == states[0] for s in states), "every rank must save the same data state"
    return packs, states[0]


def test_resume_equals_uninterrupted_stream():
    reference, _ = global_packs(1, 2, 12)
    first, state = global_packs(1, 2, 5)
    state = json.loads(json.dumps(state))                  # survives a checkpoint as JSON ...
    buf = io.BytesIO()
    torch.save(state, buf)                                 # ... and through torch.save
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    rest, _ = global_packs(1, 2, 7, state)
    assert first + rest == reference


@pytest.mark.parametrize("before,after", [((2, 2), (3, 1)), ((1, 4), (4, 1)), ((4, 1), (1, 2)), ((2, 1), (2, 3))],
                         ids=lambda dm: f"dp{dm[0]}xmb{dm[1]}")
def test_resume_into_a_different_data_parallel_size(before, after):
    """No pack is repeated or skipped: the packs seen before and after are the uninterrupted global order."""
    (dp0, mb0), (dp1, mb1) = before, after
    first, state = global_packs(dp0, mb0, 3)
    rest, _ = global_packs(dp1, mb1, 4, state)
    reference, _ = global_packs(1, 1, len(first) + len(rest))
    assert first + rest == reference


def test_ranks_see_disjoint_slices_of_one_order():
    packs_by_rank = [[rows(next(s))[0] for _ in range(6)] for s in (stage(dp_rank=r, dp_size=2) for r in range(2))]
    reference, _ = global_packs(1, 1, 12)
    assert [p for step in zip(*packs_by_rank) for p in step] == reference


def test_seed_changes_the_order_and_same_seed_repeats_it():
    a, _ = global_packs(1, 1, 4)
    b, _ = global_packs(1, 1, 4)
    c, _ = global_packs(1, 1, 4, seed=4)
    assert a == b and a != c


def test_resume_crosses_epochs_exactly():
    small = [fake_source("a", [30, 50, 70], 0)]          # several epochs per handful of packs
    s1 = make_stage(small, seq_len=64, seed=1)
    reference = [rows(next(s1)) for _ in range(20)]
    s2 = make_stage(small, seq_len=64, seed=1)
    first = [rows(next(s2)) for _ in range(9)]
    s3 = make_stage(small, seq_len=64, seed=1)
    s3.load_state_dict(s2.state_dict())
    assert first + [rows(next(s3)) for _ in range(11)] == reference
    assert s3.streams[0].epoch > 3


@pytest.mark.parametrize("change,field", [(dict(seq_len=256), "seq_len"), (dict(seed=9), "seed"),
                                          (dict(mix={"a": 0.5, "b": 0.5}), "streams"),
                                          (dict(mode="sft"), "mode")])
def test_state_from_another_configuration_is_refused(change, field):
    _, state = global_packs(1, 1, 2)
    other = stage(**change)
    with pytest.raises(DataError, match=field):
        other.load_state_dict(state)


def test_resume_through_the_real_pipeline(lee_bpe, tmp_path):
    """build_stage_data end to end (Lee corpus, BPE tokenizer): resume into another data-parallel size."""
    def build(rank, size, micro):
        return build_stage_data({"num_proc": 1, "sources": {"lee": {"format": "lee_corpus"}}}, {}, lee_bpe,
                                seq_len=256, micro_batch_size=micro, mode="pretrain", seed=0,
                                cache_dir=str(tmp_path), dp_rank=rank, dp_size=size)
    ref = build(0, 1, 1)
    reference = [rows(next(ref))[0] for _ in range(12)]
    before = [build(r, 2, 1) for r in range(2)]
    seen = [p for _ in range(3) for r in before for p in rows(next(r))]
    after = [build(r, 3, 2) for r in range(3)]
    for r in after:
        r.load_state_dict(before[1].state_dict())
    seen += [p for _ in range(1) for r in after for p in rows(next(r))]
    assert seen == reference


def test_next_stage_continues_the_document_order_when_asked():
    src = [fake_source("a", np.random.default_rng(5).integers(5, 60, 100), 0)]
    first = make_stage(src, seq_len=64, seed=5)
    for _ in range(10):
        next(first)
    state = first.state_dict()
    epoch, cursor, offset, _ = state["packer"]["streams"]["a"]
    longer = make_stage(src, seq_len=128, seed=5)
    assert longer.continue_from(state) == ["a"]
    s, doc, off, n, _ = check_batch(next(longer), 128, src)[0]
    assert (doc, off) == (int(first.streams[0].order()[cursor]), offset) and longer.streams[0].epoch == epoch
    assert make_stage(src, seq_len=128, seed=6).continue_from(state) == []            # another order
    split = make_stage(src, seq_len=128, seed=5, long_doc_min_tokens=30, long_doc_share=0.5)
    assert split.continue_from(state) == []                                           # other document sets
