"""Counted skips: bad records are left out, counted by reason with a few locations, and summarized.

A source whose first records are all bad fails fast instead: that is a wrong config, not noise.
"""

from __future__ import annotations

from collections import Counter


from moba_train.errors import UserError


class DataError(UserError):
    """Bad data, or data that does not fit the config; the message says where and how to fix it."""


EXAMPLES_PER_REASON = 3
FAIL_FAST_AFTER = 1000     # this many skips before the first usable record means the config is wrong


class SkipLog:
    def __init__(self, source: str, fail_fast_after: int = FAIL_FAST_AFTER):
        self.source = source
        self.fail_fast_after = fail_fast_after
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.kept = 0

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(where)
        if self.kept == 0 and self.total >= self.fail_fast_after:
            raise DataError(f"source {self.source!r}: the first {self.total} records were all skipped "
                            f"({self.describe()}); the source's config does not match its data "
                            f"(check format, text_field / messages_field, and the files)")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return "; ".join(f"{n} x {reason} (e.g. {', '.join(self.examples[reason])})"
                         for reason, n in self.counts.most_common())

    def brief(self) -> str:
        return f"skipped {self.total} record(s): {self.describe()}" if self.total else "no records skipped"

    def summary(self) -> str:
        return f"{self.source}: {self.brief()}"

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_dict(cls, source: str, d: dict) -> SkipLog:
        log = cls(source)
        log.counts.update(d["counts"])
        log.examples = {k: list(v) for k, v in d["examples"].items()}
        return log
