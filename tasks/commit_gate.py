"""Whether a finished run may become a version: never empty, never a systemic fault, never an outage.

A version is what ML teams train on, so three kinds of run stop before commit (staging is kept):
- **transient**: clips were quarantined because a service failed (LLM unreachable or 5xx after its
  retries, storage errors), beyond `output.max_transient_ratio`. The next run of the same config
  redoes the shards that hold them (finished requests come from the request cache), so an outage
  is never frozen into a version as "bad clips".
- **empty**: no clip became a row (unless `output.allow_empty`).
- **systemic**: more than `output.max_quarantine_ratio` of the clips were quarantined: a wrong
  setting or a broken corpus, not bad samples.
The refusal names the top reasons with an example clip each, so the fix is one look away.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel

from schemas.config import OutputConfig
from schemas.records import TRANSIENT_REASONS, Stage

RefusalKind = Literal["transient", "empty", "systemic"]
TOP_REASONS = 5
EXAMPLE_CHARS = 300
# After a refused commit, a re-run of the same run also redoes the shards with clips quarantined at
# these stages: what failed there may have been fixed outside the config (a model server, a
# classifier endpoint), while ingest/audio/feature verdicts only change with the corpus or config.
RETRY_STAGES_AFTER_REFUSAL: frozenset[str] = frozenset({Stage.asr.value, Stage.classify.value, Stage.llm.value})
TRANSIENT_CODES: frozenset[str] = frozenset(r.value for r in TRANSIENT_REASONS)


class QuarantineExample(BaseModel):
    """One quarantined clip standing for its reason in a refusal or summary."""

    id: str
    message: str


class Refusal(BaseModel):
    """Why a run was not committed; stored in staging so the next attempt knows what to retry."""

    kind: RefusalKind
    message: str


class CommitRefused(RuntimeError):
    """The run finished but must not be committed (the message says why and what to do)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal

    @property
    def kind(self) -> RefusalKind:
        return self.refusal.kind


def transient_count(by_reason: Mapping[str, int]) -> int:
    return sum(n for reason, n in by_reason.items() if reason in TRANSIENT_CODES)


def _reasons(by_reason: Mapping[str, int], examples: Mapping[str, QuarantineExample],
             only: frozenset[str] | None = None) -> str:
    """'too_short=12 (e.g. corpus/a: 0.1 s < …); silent=3 (e.g. …)', largest first."""
    items = sorted(((r, n) for r, n in by_reason.items() if n and (only is None or r in only)),
                   key=lambda kv: (-kv[1], kv[0]))
    parts = []
    for reason, n in items[:TOP_REASONS]:
        ex = examples.get(reason)
        text = f"{reason}={n:,}"
        if ex is not None:
            msg = ex.message if len(ex.message) <= EXAMPLE_CHARS else ex.message[:EXAMPLE_CHARS] + "…"
            text += f" (e.g. {ex.id}: {msg})"
        parts.append(text)
    if len(items) > TOP_REASONS:
        parts.append(f"and {len(items) - TOP_REASONS} more reason(s)")
    return "; ".join(parts)


def check_commit(*, clips_in: int, rows: int, by_reason: Mapping[str, int],
                 examples: Mapping[str, QuarantineExample], output: OutputConfig) -> Refusal | None:
    """The refusal for a finished run, or None when it may be committed."""
    quarantined = sum(by_reason.values())
    total = max(clips_in, 1)
    transient = transient_count(by_reason)
    if transient and transient / total > output.max_transient_ratio:
        return Refusal(kind="transient", message=(
            f"{transient:,} of {clips_in:,} clips could not be processed because a service failed: "
            f"{_reasons(by_reason, examples, TRANSIENT_CODES)}. Nothing was committed. Run the same command "
            "again once the service is back: finished clips are kept and only these are retried "
            f"(or set output.max_transient_ratio above {transient / total:.3f} to commit without them)."))
    if rows == 0:
        if output.allow_empty:
            return None
        return Refusal(kind="empty", message=(
            f"no clip became a row: all {clips_in:,} were quarantined ({_reasons(by_reason, examples)}). "
            "Nothing was committed. Fix the cause and run again, or set output.allow_empty: true to "
            "commit an empty version."))
    if quarantined / total > output.max_quarantine_ratio:
        return Refusal(kind="systemic", message=(
            f"{quarantined:,} of {clips_in:,} clips ({100 * quarantined / total:.1f}%) were quarantined, more "
            f"than output.max_quarantine_ratio={output.max_quarantine_ratio:g}: a systemic fault, not bad "
            f"samples. Top reasons: {_reasons(by_reason, examples)}. Nothing was committed; staging is kept. "
            "Fix the cause and run again, or raise output.max_quarantine_ratio to commit these rows "
            "(finished shards are reused)."))
    return None


def shard_needs_redo(by_reason: Mapping[str, int], by_stage: Mapping[str, int], after_refusal: bool) -> bool:
    """Whether a finished shard must be processed again by a re-run of its (uncommitted) run."""
    if transient_count(by_reason):
        return True
    return after_refusal and any(n and stage in RETRY_STAGES_AFTER_REFUSAL for stage, n in by_stage.items())
