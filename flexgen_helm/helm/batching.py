"""Pure planning logic shared by every HELM path: how requests become engine batches, and how
string stop sequences cut a generated token list. No HELM, torch or engine imports here."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class GenParams:
    """Everything that must be equal for two requests to share one engine call."""

    temperature: float
    top_p: float
    num_completions: int
    max_tokens: int
    stop_sequences: tuple[str, ...]
    top_k_per_token: int
    echo_prompt: bool

    @classmethod
    def from_request(cls, r: Any) -> "GenParams":
        return cls(float(r.temperature), float(r.top_p), int(r.num_completions), int(r.max_tokens),
                   tuple(r.stop_sequences), int(r.top_k_per_token), bool(r.echo_prompt))

    @property
    def rows_per_prompt(self) -> int:
        """Engine rows per prompt: greedy completions are all alike, so one is computed and copied."""
        return 1 if self.temperature == 0 else self.num_completions

    def label(self) -> str:
        """Stable, readable key (the timing log's `group`)."""
        stops = json.dumps(list(self.stop_sequences))
        return (f"temperature={self.temperature:g},top_p={self.top_p:g},n={self.num_completions},"
                f"max_tokens={self.max_tokens},stop={stops},top_k={self.top_k_per_token},"
                f"echo={int(self.echo_prompt)}")


@dataclass
class Item:
    index: int  # position in the caller's request list
    ids: list[int]  # prompt token ids, BOS included
    params: GenParams
    key: str = ""  # cache key (JSON); names the batch


@dataclass
class Batch:
    params: GenParams
    items: list[Item] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.items) * self.params.rows_per_prompt

    @property
    def prompt_tokens(self) -> int:
        return sum(len(it.ids) for it in self.items)

    @property
    def batch_id(self) -> str:
        """Same members -> same id, so a resumed run can be matched against the timing log."""
        h = hashlib.sha1("\n".join(sorted(it.key for it in self.items)).encode()).hexdigest()
        return h[:12]


def plan_batches(items: Sequence[Item], max_rows: int) -> list[Batch]:
    """Group by generation parameters, sort each group by prompt length, cut into batches of at
    most `max_rows` output rows (at least one prompt each).

    Sorting across sub-scenarios is what keeps padding low: neighbours in a batch have nearly
    equal lengths, instead of everything padded to one length. Longest batches run first, so a
    workload that does not fit in memory fails at the start instead of hours in.
    """
    groups: dict[GenParams, list[Item]] = {}
    for it in items:
        groups.setdefault(it.params, []).append(it)
    batches: list[Batch] = []
    for params, members in groups.items():
        per_batch = max(1, max_rows // params.rows_per_prompt)
        members = sorted(members, key=lambda it: (-len(it.ids), it.index))
        for start in range(0, len(members), per_batch):
            batches.append(Batch(params, members[start:start + per_batch]))
    return batches


def padded_tokens(lengths: Sequence[int], micro_batch: int) -> int:
    """Prompt tokens after left-padding each consecutive micro-batch to its longest row."""
    return sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
               for i in range(0, len(lengths), micro_batch))


def single_pad_efficiency(lengths: Sequence[int], round_to: int = 256) -> float:
    """What FlexGen's HELM driver got: every prompt padded to one length (the longest, rounded
    up to a multiple of `round_to`)."""
    if not lengths:
        return 1.0
    pad = -(-max(lengths) // round_to) * round_to
    return sum(lengths) / (pad * len(lengths))


def cut_at_stop(decode: Callable[[Sequence[int]], str], seq: Sequence[int],
                stops: Sequence[str]) -> tuple[int, str, bool]:
    """Cut generated tokens at the earliest stop string, judged on the decoded text.

    Returns (k, text, stopped): the text before the stop (or all of it), and the number k of whole
    tokens that lie before the stop. Decoded text, not the concatenated per-token texts: byte-level
    tokenizers split a multi-byte character over tokens whose own texts are U+FFFD, so a stop such
    as "é" only appears once the tokens are decoded together.
    """
    full = decode(seq)
    hits = [p for p in (full.find(s) for s in stops if s) if p >= 0]
    if not hits:
        return len(seq), full, False
    pos = min(hits)
    text = full[:pos]
    k = 0
    for j in range(1, len(seq) + 1):  # the longest token prefix whose decoding is a prefix of text
        prefix = decode(seq[:j])
        if len(prefix) > pos + 4:  # past the stop (4: slack for a partly decoded character)
            break
        if text.startswith(prefix):
            k = j
    return k, text, True
