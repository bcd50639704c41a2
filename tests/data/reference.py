"""Plain reference checks of the micro-batch contract (docs/architecture.md), and synthetic sources whose
token values are their own positions, so every token of a pack can be traced to its document."""

from __future__ import annotations

import numpy as np

from moba_train.data import DataConfig, SourceConfig, StageDataConfig
from moba_train.data.cache import TokenizedSource
from moba_train.data.stage import StageData

PAD_ID = -7          # no synthetic token has this value, so padding is recognizable
SOURCE_STRIDE = 10**7


def fake_source(name: str, doc_lengths, index: int = 0, targets=None) -> TokenizedSource:
    """Source number `index`: its tokens are index * SOURCE_STRIDE + position; `targets` marks SFT targets."""
    offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=offsets[1:])
    tokens = np.arange(offsets[-1], dtype=np.int64) + index * SOURCE_STRIDE
    meta = {"key": f"{name:x<16}"[:16], "skips": {"counts": {}, "examples": {}}}
    return TokenizedSource(name=name, directory="", chat=targets is not None, tokens=tokens, offsets=offsets,
                           targets=None if targets is None else np.asarray(targets, dtype=np.uint8), meta=meta)


def make_stage(sources: list[TokenizedSource], *, seq_len: int, micro_batch_size: int = 1, mode: str = "pretrain",
               seed: int = 0, dp_rank: int = 0, dp_size: int = 1, holdout: float = 0.0, lookahead: int = 16,
               **stage_fields) -> StageData:
    data = DataConfig(sources={s.name: SourceConfig(format="jsonl", path="-", holdout_fraction=holdout) for s in sources},
                      lookahead=lookahead)
    return StageData(data, StageDataConfig(**stage_fields), {s.name: s for s in sources}, seq_len=seq_len,
                     micro_batch_size=micro_batch_size, mode=mode, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                     pad_id=PAD_ID)


def check_batch(batch: dict, seq_len: int, sources: list[TokenizedSource], sft: bool = False) -> list[tuple]:
    """Assert the contract on a micro-batch of synthetic sources; return its segments as
    (source index or None for padding, document, offset in the document, length, row)."""
    ids, pos, lab, cu = (batch[k].numpy() for k in ("input_ids", "position_ids", "shift_labels", "cu_seqlens"))
    B = ids.shape[0]
    assert ids.shape == pos.shape == lab.shape == (B, seq_len)
    assert batch["input_ids"].dtype == batch["position_ids"].dtype == batch["shift_labels"].dtype
    assert str(batch["input_ids"].dtype) == "torch.int64" and str(batch["cu_seqlens"].dtype) == "torch.int32"
    assert cu[0] == 0 and cu[-1] == B * seq_len and np.all(np.diff(cu) > 0)
    assert set(range(0, B * seq_len + 1, seq_len)) <= set(cu.tolist()), "a document spans two rows"
    flat_ids, flat_pos, flat_lab = ids.reshape(-1), pos.reshape(-1), lab.reshape(-1)
    segments = []
    for a, e in zip(cu[:-1], cu[1:]):
        n = e - a
        assert np.array_equal(flat_pos[a:e], np.arange(n)), "position_ids must restart at 0 per document"
        seg = flat_ids[a:e]
        if seg[0] == PAD_ID:
            assert np.all(seg == PAD_ID) and np.all(flat_lab[a:e] == -100), "padding must be its own document"
            segments.append((None, None, 0, n, a // seq_len))
            continue
        src_i = int(seg[0] // SOURCE_STRIDE)
        src = sources[src_i]
        local = seg - src_i * SOURCE_STRIDE
        assert np.array_equal(np.diff(local), np.ones(n - 1)), "a segment must be contiguous text of one document"
        doc = int(np.searchsorted(src.offsets, local[0], side="right") - 1)
        doc_end = src.offsets[doc + 1]
        assert local[-1] < doc_end, "a segment must not run into the next document"
        expected = local + 1
        expected = np.where(expected < doc_end, expected + src_i * SOURCE_STRIDE, -100)
        if sft and src.targets is not None:
            nxt = np.minimum(local + 1, len(src.targets) - 1)
            expected = np.where((local + 1 < doc_end) & (src.targets[nxt] == 1), expected, -100)
        assert np.array_equal(flat_lab[a:e], expected), "shift_labels must be each token's next token in its document"
        segments.append((src_i, doc, int(local[0] - src.offsets[doc]), n, a // seq_len))
    assert batch["max_seqlen"] == max(s[3] for s in segments)
    return segments
