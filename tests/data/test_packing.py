"""Packing boundaries and the contract, on synthetic sources checked by a plain reference (reference.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from moba_train.data.packing import Mixer, Packer, Stream, materialize
from tests.data.reference import PAD_ID, check_batch, fake_source, make_stage

L = 64


def one_pass(doc_lengths, *, cut: bool, seq_len: int = L, lookahead: int = 16, targets=None):
    """Pack one source in document order until it runs out; return (batches as tensors, the source)."""
    import torch
    src = fake_source("s", doc_lengths, targets=targets)
    stream = Stream("s", 0, np.arange(len(doc_lengths)), 1.0, seed=0, cycle=False)
    packer = Packer(Mixer([stream], [src.offsets], seq_len), seq_len, cut=cut, lookahead=lookahead)
    batches = []
    while (pack := packer.next_pack()) is not None:
        arrays = materialize([pack], seq_len, [src.tokens], [src.targets if targets is not None else None], PAD_ID)
        batches.append({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()})
    return batches, src


def covered_tokens(segments_per_batch, src) -> Counter:
    seen = Counter()
    for segments in segments_per_batch:
        for s, doc, off, n, _ in segments:
            if s is not None:
                seen.update(range(src.offsets[doc] + off, src.offsets[doc] + off + n))
    return seen


BOUNDARY_CASES = {
    "doc-cut-across-packs": [45] * 9,                    # 0.7 L each: nothing fits the 19-token tails
    "many-tiny-docs": list(np.random.default_rng(0).integers(1, 6, size=300)),
    "one-giant-doc": [10 * L + 7],
    "exactly-one-pack": [L, L, L],
    "mixed": [3, 70, 64, 1, 200, 9, 33, 31, 2, 128],
}


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
@pytest.mark.parametrize("case", list(BOUNDARY_CASES))
def test_every_token_packed_once_under_the_contract(case, mode):
    lengths = BOUNDARY_CASES[case]
    batches, src = one_pass(lengths, cut=mode == "pretrain")
    segments = [check_batch(b, L, [src]) for b in batches]
    seen = covered_tokens(segments, src)
    assert sorted(seen) == list(range(sum(lengths))) and set(seen.values()) == {1}
    pads = sum(n for segs in segments for s, _, _, n, _ in segs if s is None)
    if mode == "pretrain":
        assert pads < L, "pretraining pads only the very last pack of a one-pass stream"
    else:   # SFT never cuts a document that fits a pack
        pieces = Counter(doc for segs in segments for s, doc, _, _, _ in segs if s is not None)
        assert all(pieces[d] == -(-n // L) for d, n in enumerate(lengths) if n > 0)


def test_document_cut_across_packs_keeps_its_target():
    batches, src = one_pass([45] * 4, cut=True, lookahead=0)
    ids, lab = batches[0]["input_ids"][0], batches[0]["shift_labels"][0]
    # pack 0: doc 0 whole (45) + the first 19 tokens of doc 1, whose last token still predicts doc 1's 20th
    assert batches[0]["cu_seqlens"].tolist() == [0, 45, 64]
    assert lab[44] == -100 and lab[63] == ids[63] + 1 == 45 + 19
    assert batches[1]["input_ids"][0, 0] == 45 + 19 and batches[1]["position_ids"][0, 0] == 0


def test_giant_document_is_split_at_the_pack_length():
    batches, src = one_pass([3 * L + 5], cut=True)
    assert [b["cu_seqlens"].tolist() for b in batches[:3]] == [[0, L]] * 3
    assert [int(b["shift_labels"][0, -1]) for b in batches[:3]] == [L, 2 * L, 3 * L]   # continuation targets
    assert batches[3]["cu_seqlens"].tolist() == [0, 5, L] and batches[3]["shift_labels"][0, 4] == -100


def test_long_documents_stay_whole_when_short_ones_can_fill_the_tail():
    rng = np.random.default_rng(1)
    lengths = [int(x) for pair in zip(rng.integers(40, 60, 60), rng.integers(2, 9, 60)) for x in (pair[0], *[pair[1]] * 4)]
    batches, src = one_pass(lengths, cut=True, lookahead=16)
    segments = [check_batch(b, L, [src]) for b in batches]
    cut_long = [(doc, n) for segs in segments for s, doc, _, n, _ in segs
                if s is not None and lengths[doc] >= 40 and n != lengths[doc]]
    assert cut_long == []


def test_sft_targets_follow_the_assistant_mask():
    lengths = [10, 20, 30]
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, size=sum(lengths))
    batches, src = one_pass(lengths, cut=False, targets=targets)
    for b in batches:
        check_batch(b, L, [src], sft=True)


def token_shares(stage, steps: int, n_sources: int):
    per_source, long_tokens = np.zeros(n_sources), np.zeros(n_sources)
    for _ in range(steps):
        for s, doc, _, n, _ in check_batch(next(stage), stage.seq_len, [stage.sources[k] for k in stage.names]):
            if s is not None:
                per_source[s] += n
                long_tokens[s] += n * (stage.sources[stage.names[s]].lengths[doc] >= 256)
    return per_source / per_source.sum(), long_tokens / np.maximum(per_source, 1)


def three_sources():
    rng = np.random.default_rng(3)
    return [fake_source("code", rng.integers(50, 2000, 300), 0),          # long-ish documents
            fake_source("prose", rng.integers(20, 400, 500), 1),
            fake_source("tiny", rng.integers(2, 30, 2000), 2)]


def test_mix_proportions_within_2_percent():
    stage = make_stage(three_sources(), seq_len=512, micro_batch_size=4, mix={"code": 5, "prose": 3, "tiny": 2})
    shares, _ = token_shares(stage, 100, 3)
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 0.02, shares


def test_natural_mix_follows_source_sizes():
    sources = three_sources()
    stage = make_stage(sources, seq_len=512, micro_batch_size=4)
    sizes = np.array([s.offsets[-1] for s in sources], dtype=float)
    shares, _ = token_shares(stage, 100, 3)
    assert np.abs(shares - sizes / sizes.sum()).max() < 0.02, shares


@pytest.mark.parametrize("long_share", [0.0, 0.6, 1.0])
def test_long_document_share_within_2_percent(long_share):
    stage = make_stage(three_sources()[:2], seq_len=512, micro_batch_size=4, mix={"code": 0.5, "prose": 0.5},
                       long_doc_min_tokens=256, long_doc_share=long_share)
    shares, long_part = token_shares(stage, 100, 2)
    assert np.abs(shares - [0.5, 0.5]).max() < 0.02, shares        # the source shares hold as well
    assert abs(long_part[0] - long_share) < 0.02 and abs(long_part[1] - long_share) < 0.02, long_part


def test_overflow_drop_leaves_out_documents_longer_than_a_pack():
    src = fake_source("s", [10, 100, 20, 65, 64])
    stage = make_stage([src], seq_len=64, overflow="drop")
    docs = {doc for _ in range(20) for s, doc, *_ in check_batch(next(stage), 64, [src]) if s is not None}
    assert docs == {0, 2, 4}
    assert "leaves out 2 documents longer than 64" in stage.report()


def test_materialize_matches_a_hand_written_pack():
    src = fake_source("s", [3, 4])
    out = materialize([[(0, 0, 3, 3), (0, 3, 2, 7), (-1, 0, 3, 0)]], 8, [src.tokens], [None], PAD_ID)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3, 4, PAD_ID, PAD_ID, PAD_ID]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert out["shift_labels"].tolist() == [[1, 2, -100, 4, 5, -100, -100, -100]]
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8] and out["max_seqlen"] == 3
