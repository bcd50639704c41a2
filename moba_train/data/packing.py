"""The pack planner: document streams, their token-exact mix, and packs of exactly the stage length.

A *piece* is `(source, start, length, end)`: tokens[start:start + length] of a document that ends at
`end` (end > start + length when the document goes on in a later piece). A padding piece has source PAD.

- `Stream`: the documents of one source (or of its long / short documents) in a seeded order, one
  permutation per epoch; a document longer than the pack length comes out as consecutive pieces.
- `Mixer`: hands out the next piece from the stream furthest behind its token share, so the shares
  of a stage's tokens match the configured mix to within one piece.
- `Packer`: fills packs in mix order. When the next piece does not fit the room left, it takes the first
  of the next `lookahead` queued pieces that fits; when none does, pretraining cuts the shortest queued
  piece at the pack boundary (the rest stays queued, so long documents stay whole wherever possible)
  and SFT pads the pack instead (a conversation is never cut for lack of room).

Everything is a pure function of the seed and the counters in `state()`, which is what makes resume exact.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

PAD = -1
Piece = tuple   # (source, start, length, end)


@dataclass
class Stream:
    key: str                  # names the stream in states and reports: "<source>" or "<source>/long"
    source: int               # index of the source's tokens
    docs: np.ndarray          # the documents it draws from (ids into the source's offsets)
    weight: float             # its share of the mix's tokens
    seed: int
    cycle: bool = True        # False: one pass in document order (validation), then exhausted
    epoch: int = 0
    cursor: int = 0           # position in this epoch's order
    offset: int = 0           # tokens of the current document already handed out
    emitted: int = 0          # tokens handed out, for the mix
    _order: np.ndarray | None = field(default=None, repr=False)

    def order(self) -> np.ndarray:
        if self._order is None:
            if self.cycle:
                rng = np.random.default_rng([self.seed, zlib.crc32(self.key.encode()), self.epoch])
                self._order = self.docs[rng.permutation(len(self.docs))]
            else:
                self._order = self.docs
        return self._order

    @property
    def exhausted(self) -> bool:
        return not self.cycle and self.cursor >= len(self.docs)

    def next_piece(self, offsets: np.ndarray, max_len: int) -> Piece:
        doc = int(self.order()[self.cursor])
        start, end = int(offsets[doc]) + self.offset, int(offsets[doc + 1])
        length = min(end - start, max_len)
        if start + length == end:
            self.cursor, self.offset = self.cursor + 1, 0
            if self.cursor == len(self.docs) and self.cycle:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        else:
            self.offset += length
        self.emitted += length
        return (self.source, start, length, end)

    def state(self) -> list[int]:
        return [self.epoch, self.cursor, self.offset, self.emitted]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.cursor, self.offset, self.emitted = (int(x) for x in state)
        self._order = None


class Mixer:
    def __init__(self, streams: list[Stream], offsets: list[np.ndarray], max_len: int):
        self.streams = streams
        self.offsets = offsets
        self.max_len = max_len

    def next_piece(self) -> Piece | None:
        best = None
        for s in self.streams:
            if not s.exhausted and (best is None or s.emitted * best.weight < best.emitted * s.weight):
                best = s
        return None if best is None else best.next_piece(self.offsets[best.source], self.max_len)


class Packer:
    def __init__(self, mixer: Mixer, seq_len: int, cut: bool, lookahead: int):
        self.mixer = mixer
        self.seq_len = seq_len
        self.cut = cut
        self.lookahead = lookahead
        self.queue: list[Piece] = []

    def _queued(self, n: int) -> bool:
        """Make the queue at least n long; False if the streams ran out first."""
        while len(self.queue) < n:
            piece = self.mixer.next_piece()
            if piece is None:
                return False
            self.queue.append(piece)
        return True

    def _first_fit(self, room: int) -> int | None:
        for i in range(self.lookahead + 1):
            if not self._queued(i + 1):
                return None
            if self.queue[i][2] <= room:
                return i
        return None

    def next_pack(self) -> list[Piece] | None:
        """The pieces of the next pack (padded to seq_len), or None when no data is left (one-pass streams)."""
        pack, room = [], self.seq_len
        while room and self._queued(1):
            fit = self._first_fit(room)
            if fit is not None:
                pack.append(self.queue.pop(fit))
                room -= pack[-1][2]
            elif self.cut:
                i = min(range(len(self.queue)), key=lambda j: self.queue[j][2])
                src, start, length, end = self.queue[i]
                pack.append((src, start, room, end))
                self.queue[i] = (src, start + room, length - room, end)
                room = 0
            else:
                break
        if room == self.seq_len:
            return None
        if room:
            pack.append((PAD, 0, room, 0))
        return pack

    def state(self) -> dict:
        return {"queue": [list(p) for p in self.queue], "streams": {s.key: s.state() for s in self.mixer.streams}}

    def restore(self, state: dict) -> None:
        self.queue = [tuple(int(x) for x in p) for p in state["queue"]]
        for s in self.mixer.streams:
            s.restore(state["streams"][s.key])


def materialize(packs: list[list[Piece]], seq_len: int, tokens: list[np.ndarray],
                targets: list[np.ndarray | None], pad_id: int) -> dict[str, np.ndarray | int]:
    """Packs to the micro-batch contract of docs/architecture.md (as numpy; the caller makes tensors).

    `targets[source]` is None where every token is a target (pretraining) and the assistant mask for SFT.
    A piece's last position predicts the document's next token when the document goes on in a later pack.
    """
    B = len(packs)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), -100, dtype=np.int64)
    doc_starts = np.zeros((B, seq_len), dtype=np.int64)
    cu, longest = [0], 0
    for b, pack in enumerate(packs):
        pos = 0
        for src, start, length, end in pack:
            doc_starts[b, pos:pos + length] = pos
            if src != PAD:
                tok = tokens[src]
                input_ids[b, pos:pos + length] = tok[start:start + length]
                stop = min(start + length + 1, end)
                nxt = tok[start + 1:stop].astype(np.int64)   # ids are stored unsigned: -100 must not wrap
                if targets[src] is not None:
                    nxt = np.where(targets[src][start + 1:stop] != 0, nxt, -100)
                labels[b, pos:pos + len(nxt)] = nxt
            pos += length
            longest = max(longest, length)
            cu.append(b * seq_len + pos)
        assert pos == seq_len, f"pack {b} holds {pos} tokens, not {seq_len}"
    positions = np.arange(seq_len, dtype=np.int64)[None, :] - doc_starts
    return {"input_ids": input_ids, "position_ids": positions, "shift_labels": labels,
            "cu_seqlens": np.asarray(cu, dtype=np.int32), "max_seqlen": int(longest)}
