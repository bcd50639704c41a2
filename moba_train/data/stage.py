"""A stage's data: tokenized sources, its mix, and the micro-batches of one data-parallel rank.

The packs of a stage form one global order, a pure function of (seed, configs, tokenizer). Each call to
`next()` plans the next `micro_batch_size * dp_size` packs of that order and returns this rank's slice, so a
resume (`load_state_dict`) continues the global order at the same pack whatever the new data-parallel size:
no pack is repeated or skipped. Ranks of one sequence-parallel group pass the same dp_rank and share a pack.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch

from moba_train.data.cache import TokenizedSource, backend_tokenizer, open_source
from moba_train.data.config import (DataConfig, StageDataConfig, check_stage_against_sources, parse_data_config,
                                    parse_stage_data_config)
from moba_train.data.packing import PAD, Mixer, Packer, Stream, materialize
from moba_train.data.skips import DataError
from moba_train.schema import ConfigError

MODES = ("pretrain", "sft")
STATE_VERSION = 1


def build_stage_data(data: DataConfig | dict, stage: StageDataConfig | dict, tokenizer, *, seq_len: int,
                     micro_batch_size: int, mode: str, seed: int, cache_dir: str, dp_rank: int = 0,
                     dp_size: int = 1, where: str = "stage") -> StageData:
    """Check the configs, tokenize what is not cached yet, and return the stage's micro-batch iterator.

    `where` names the stage in error messages (e.g. "stages[1] (ctx32k)").
    """
    data, stage, names = check_stage_data(data, stage, seq_len=seq_len, mode=mode, where=where)
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"{where}: need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                          f"{micro_batch_size}, {dp_rank}, {dp_size}")
    backend_tokenizer(tokenizer)   # fail on a slow tokenizer before reading anything
    tokenized = {name: open_source(name, data.sources[name], tokenizer, data, cache_dir) for name in names}
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return StageData(data, stage, tokenized, seq_len=seq_len, micro_batch_size=micro_batch_size, mode=mode,
                     seed=seed, dp_rank=dp_rank, dp_size=dp_size, pad_id=pad_id, where=where)


def check_stage_data(data: DataConfig | dict, stage: StageDataConfig | dict, *, seq_len: int, mode: str,
                     where: str = "stage") -> tuple[DataConfig, StageDataConfig, list[str]]:
    """Everything about a stage's data that can fail before reading it: schemas, the mix against the
    sources, and that each source the stage mixes exists here. The trainer runs it for every stage at
    start-up, so a bad source of the last stage fails before the first step, not hours later."""
    data = parse_data_config(data, used=[])
    stage = parse_stage_data_config(stage, f"{where}.data")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode must be one of {list(MODES)}, got {mode!r}")
    check_stage_against_sources(stage, data, seq_len, f"{where}.data")
    names = _mixed_sources(stage, data, mode, where)
    data = parse_data_config(data, used=names)
    return data, stage, names


def _mixed_sources(stage: StageDataConfig, data: DataConfig, mode: str, where: str) -> list[str]:
    from moba_train.data.sources import is_chat
    if stage.mix:
        names = list(stage.mix)
        if mode == "sft":
            plain = [n for n in names if not is_chat(data.sources[n])]
            if plain:
                raise ConfigError(f"{where}.data.mix: SFT stages train on conversations, but source(s) {plain} hold "
                                  f"plain documents; mix chat sources (messages_field or prompt_field/response_field, "
                                  f"or lee_sft) or make the stage mode: pretrain")
        return names
    # no mix: every source that suits the mode, in proportion to its size
    names = [n for n, src in data.sources.items() if is_chat(src) == (mode == "sft")]
    if not names:
        raise ConfigError(f"{where}.data.mix is empty and data.sources has no {'chat' if mode == 'sft' else 'plain'} "
                          f"source for a {mode} stage; name the sources and their shares in {where}.data.mix")
    return names


def holdout_mask(n_docs: int, fraction: float) -> np.ndarray:
    """Which documents are held out: a fixed hash of the document's index (splitmix64), seed-free, so the
    validation set never changes with the training seed, and a larger fraction holds out a superset."""
    x = np.arange(n_docs, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < fraction


def count_target_tokens(batch: dict) -> int:
    """Positions with a target in a micro-batch: the weight of its loss in a token-weighted mean over
    micro-batches and ranks (sum the per-token losses, all-reduce sums and counts, divide)."""
    return int((batch["shift_labels"] != -100).sum())


class StageData:
    def __init__(self, data: DataConfig, stage: StageDataConfig, tokenized: dict[str, TokenizedSource], *,
                 seq_len: int, micro_batch_size: int, mode: str, seed: int, dp_rank: int, dp_size: int,
                 pad_id: int, where: str = "stage"):
        self.data, self.stage, self.sources = data, stage, tokenized
        self.seq_len, self.micro_batch_size, self.mode, self.seed = seq_len, micro_batch_size, mode, seed
        self.dp_rank, self.dp_size, self.pad_id, self.where = dp_rank, dp_size, pad_id, where
        self.names = list(tokenized)
        self._tokens = [tokenized[n].tokens for n in self.names]
        self._targets = [tokenized[n].targets if mode == "sft" else None for n in self.names]
        self._offsets = [tokenized[n].offsets for n in self.names]
        self.train_docs, self.heldout_docs = {}, {}
        for name, src in tokenized.items():
            held = holdout_mask(src.n_docs, data.sources[name].holdout_fraction)
            self.train_docs[name], self.heldout_docs[name] = np.flatnonzero(~held), np.flatnonzero(held)
        self.shares = self._shares()
        self.streams, self.notes = self._training_streams()
        self.packs_consumed = 0
        self._packer = Packer(Mixer(self.streams, self._offsets, seq_len), seq_len, cut=mode == "pretrain",
                              lookahead=data.lookahead)
        self.fingerprint = self._fingerprint()

    # ------------------------------------------------------------ building

    def _shares(self) -> dict[str, float]:
        weights = dict(self.stage.mix) or {n: float(self.sources[n].lengths[self.train_docs[n]].sum())
                                           for n in self.names}
        total = sum(weights.values())
        return {n: weights[n] / total for n in self.names}

    def _training_streams(self) -> tuple[list[Stream], list[str]]:
        L, stage, streams, notes = self.seq_len, self.stage, [], []
        longest = {}
        for i, name in enumerate(self.names):
            lengths, docs = self.sources[name].lengths, self.train_docs[name]
            if not len(docs):
                raise DataError(f"source {name!r}: all {self.sources[name].n_docs} documents are held out; lower "
                                f"data.sources.{name}.holdout_fraction")
            # A conversation cut in two would leave a piece of prompt without its answer (a pack without
            # targets) and an answer without its prompt: SFT drops conversations that do not fit.
            if stage.overflow == "drop" or self.mode == "sft":
                too_long = lengths[docs] > L
                if too_long.any():
                    why = "SFT keeps conversations whole and" if self.mode == "sft" else "overflow=drop"
                    notes.append(f"{name}: {why} leaves out {int(too_long.sum())} documents longer than {L}")
                docs = docs[~too_long]
                if not len(docs):
                    fix = ("raise the SFT stage's seq_len" if self.mode == "sft"
                           else "set overflow: split to train on them in pieces")
                    raise DataError(f"{self.where}.data: every training document of source {name!r} is longer than "
                                    f"seq_len {L}; {fix}")
            longest[name] = int(lengths[docs].max())
            share = self.shares[name]
            parts = [(name, docs, share)]
            if stage.long_doc_share is not None:
                is_long = lengths[docs] >= stage.long_doc_min_tokens
                long_docs, short_docs = docs[is_long], docs[~is_long]
                if len(long_docs) and len(short_docs):
                    parts = [(f"{name}/long", long_docs, share * stage.long_doc_share),
                             (f"{name}/short", short_docs, share * (1 - stage.long_doc_share))]
                    parts = [p for p in parts if p[2] > 0]
                else:
                    notes.append(f"{name}: {'all' if len(long_docs) else 'none'} of its documents reach "
                                 f"long_doc_min_tokens={stage.long_doc_min_tokens}, so its long share is "
                                 f"{'1' if len(long_docs) else '0'}")
            streams += [Stream(key, i, d, w, self.seed) for key, d, w in parts]
        if stage.long_doc_share and all(n < stage.long_doc_min_tokens for n in longest.values()):
            raise DataError(f"{self.where}.data: long_doc_share={stage.long_doc_share} but no training document of "
                            f"{self.names} reaches long_doc_min_tokens={stage.long_doc_min_tokens} (longest: "
                            f"{max(longest.values())} tokens); lower long_doc_min_tokens, add a source with long "
                            f"documents, or set long_doc_share: null")
        return streams, notes

    def _fingerprint(self) -> dict:
        """What the global pack order depends on; a state only resumes a stage data with the same."""
        return {
            "seed": self.seed, "seq_len": self.seq_len, "mode": self.mode, "lookahead": self.data.lookahead,
            "overflow": self.stage.overflow, "long_doc_min_tokens": self.stage.long_doc_min_tokens,
            "long_doc_share": self.stage.long_doc_share,
            "streams": {s.key: [round(s.weight, 12), len(s.docs), zlib.crc32(s.docs.tobytes())] for s in self.streams},
            "caches": {n: self.sources[n].meta["key"][:16] for n in self.names},
        }

    # ------------------------------------------------------------ training iterator

    def __iter__(self) -> StageData:
        return self

    def __next__(self) -> dict:
        per_step = self.micro_batch_size * self.dp_size
        packs = [self._packer.next_pack() for _ in range(per_step)]
        self.packs_consumed += per_step
        mine = packs[self.dp_rank * self.micro_batch_size:(self.dp_rank + 1) * self.micro_batch_size]
        return self._batch(mine, self.seq_len)

    def _batch(self, packs: list, seq_len: int) -> dict:
        arrays = materialize(packs, seq_len, self._tokens, self._targets, self.pad_id)
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}

    def state_dict(self) -> dict:
        """Everything the rest of the stream depends on beyond the configs; equal on every rank."""
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "packs_consumed": self.packs_consumed,
                "packer": json.loads(json.dumps(self._packer.state()))}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}; it was written by "
                            f"another moba-train version: resume the stage's data from its start")
        saved = state["fingerprint"]
        if saved != self.fingerprint:
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise DataError(f"{self.where}: the data state was saved for a different pack order ({', '.join(changed)} "
                            f"changed: saved {[saved.get(k) for k in changed]}, now "
                            f"{[self.fingerprint.get(k) for k in changed]}); resume with the same data config, "
                            f"seed and tokenizer, or start the stage's data from its beginning")
        self._packer.restore(state["packer"])
        self.packs_consumed = int(state["packs_consumed"])

    def continue_from(self, previous: dict) -> list[str]:
        """Start this stage where a previous stage's state left its documents (carry_over.data_position):
        each stream over the same documents with the same seed continues its epoch and order, so the new
        stage does not revisit documents the previous one has not finished with. Mix counters and packing
        start fresh; the up to `lookahead + 1` pieces queued at the end of the previous stage are not carried.
        Returns the keys of the streams that continued."""
        old = previous["fingerprint"]
        if old["seed"] != self.seed:
            return []
        continued = []
        for s in self.streams:
            source = self.names[s.source]
            same_cache = old["caches"].get(source) == self.fingerprint["caches"][source]
            if same_cache and old["streams"].get(s.key, [None])[1:] == self.fingerprint["streams"][s.key][1:]:
                epoch, cursor, offset, _ = previous["packer"]["streams"][s.key]
                s.restore([epoch, cursor, offset, 0])
                continued.append(s.key)
        return continued

    # ------------------------------------------------------------ validation

    def validation_batches(self, seq_len: int | None = None, micro_batch_size: int | None = None,
                           max_packs: int | None = None, min_doc_tokens: int = 0) -> list[dict]:
        """This rank's micro-batches of the held-out documents, packed at `seq_len` (default: the stage's).

        One pass over the held-out documents of the mixed sources (those of at least `min_doc_tokens`),
        interleaved by the mix shares, at most `max_packs` packs in all. Every rank gets the same number of
        micro-batches (all-padding packs fill the last step), so collective ops stay in step.
        """
        L = seq_len or self.seq_len
        B = micro_batch_size or self.micro_batch_size
        streams = []
        for i, name in enumerate(self.names):
            docs = self.heldout_docs[name]
            lengths = self.sources[name].lengths[docs]
            keep = lengths >= min_doc_tokens
            if self.stage.overflow == "drop" or self.mode == "sft":
                keep &= lengths <= L
            if keep.any():
                streams.append(Stream(name, i, docs[keep], self.shares[name], self.seed, cycle=False))
        if not streams:
            held = {n: len(self.heldout_docs[n]) for n in self.names}
            whole = self.stage.overflow == "drop" or self.mode == "sft"
            if whole and any(held.values()) and min_doc_tokens <= 1:
                kind = "conversation" if self.mode == "sft" else "document"
                raise DataError(f"{self.where}: every held-out {kind} of {self.names} (held out: {held}) is longer than "
                                f"seq_len {L}, and {'SFT keeps conversations whole' if self.mode == 'sft' else 'overflow=drop'}"
                                f"; raise the stage's seq_len, or set stages[].eval=false")
            raise DataError(f"{self.where}: no held-out document of {self.names} to validate on (held out: {held}"
                            f"{f', of at least {min_doc_tokens} tokens' if min_doc_tokens else ''}); raise "
                            f"data.sources.<name>.holdout_fraction"
                            + (" or lower min_doc_tokens" if min_doc_tokens else "") + ", or set stages[].eval=false")
        packer = Packer(Mixer(streams, self._offsets, L), L, cut=self.mode == "pretrain", lookahead=self.data.lookahead)
        packs = []
        while max_packs is None or len(packs) < max_packs:
            pack = packer.next_pack()
            if pack is None:
                break
            packs.append(pack)
        per_step = B * self.dp_size
        steps = math.ceil(len(packs) / per_step)
        packs += [[(PAD, 0, L, 0)]] * (steps * per_step - len(packs))
        first = self.dp_rank * B
        return [self._batch(packs[k * per_step + first:k * per_step + first + B], L) for k in range(steps)]

    # ------------------------------------------------------------ reporting

    def report(self, listed: set[str] | None = None) -> str:
        """Sources, shares, held-out split, skips, epochs: for the log at the stage's start and end.

        `listed`: the sources whose skipped records an earlier report of the run listed in full (updated here);
        their line then gives only the count."""
        lines = [f"{self.where} data: {self.mode}, seq_len {self.seq_len}, {self.packs_consumed} packs consumed"]
        for name in self.names:
            src = self.sources[name]
            train = int(src.lengths[self.train_docs[name]].sum())
            held = int(src.lengths[self.heldout_docs[name]].sum())
            skips = src.skips.brief()
            if listed is not None:
                if src.skips.total and name in listed:      # the reasons and examples once, then the count
                    skips = f"skipped {src.skips.total} record(s), as listed above"
                listed.add(name)
            lines.append(f"  {name}: share {self.shares[name]:.3f}; {len(self.train_docs[name])} training documents "
                         f"({train:,} tokens), {len(self.heldout_docs[name])} held out ({held:,} tokens); {skips}")
        total = sum(s.emitted for s in self.streams) or 1
        for s in self.streams:
            lines.append(f"  stream {s.key}: weight {s.weight:.3f}, {len(s.docs)} documents, epoch {s.epoch}, "
                         f"{s.emitted / total:.3f} of the tokens so far")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
