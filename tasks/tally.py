"""What a shard counts while its clips go through: quarantine rows (each logged, within a budget),
rows, audio seconds, attribute words, QC failures, tokens and seconds per stage.

Every stage module (measure, rows, the shard loop) adds to one `ShardTally`; the shard loop turns it
into the shard's outcome. An unexpected error in one clip quarantines that clip, never the shard.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from schemas.records import Clip, QuarantineRow, ReasonCode, Stage, utc_now
from tasks.commit_gate import EXAMPLE_CHARS, QuarantineExample
from tasks.gpu import StageGate, no_gate

# Not Prefect's logger (tasks/ stays plain Python): the flow forwards "speechpairs" records to the
# Prefect API, so each quarantined clip shows in the run's logs with its shard and clip id.
log = logging.getLogger("speechpairs.pipeline")

QUARANTINE_LOG_PER_REASON = 20


@dataclass
class ShardTally:
    quarantine: list[QuarantineRow] = field(default_factory=list)
    attribute_counts: dict[str, Counter[str]] = field(default_factory=dict)
    audio_seconds: float = 0.0
    n_rows: int = 0
    stage_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    qc_failures: Counter[str] = field(default_factory=Counter)
    tokens_prompt: int = 0
    tokens_completion: int = 0
    rows_without_transcript: int = 0
    # Long recordings (tasks/segment/clips.py): planned clips fully handed on (each whole clip, or a
    # recording once its last segment is), recordings cut into >= 1 segment, and those segments.
    refs_done: int = 0
    recordings_cut: int = 0
    segments: int = 0
    examples: dict[str, QuarantineExample] = field(default_factory=dict)
    unlogged: Counter[str] = field(default_factory=Counter)  # quarantined beyond the log budget
    run_id: str = ""
    shard: int = -1  # the shard's index, for log lines
    # The run's planned-at time, stamped on every row: redoing a shard gives byte-identical output.
    created_at: datetime = field(default_factory=utc_now)
    # Held around each model stage's compute: the flow passes a GPU concurrency limit (tasks/gpu.py).
    gate: StageGate = no_gate


def quarantine(tally: ShardTally, clip: Clip, stage: Stage, reason: ReasonCode, message: str) -> None:
    """Record `clip` as a quarantine row with its stage and reason, and log it while the budget lasts."""
    replay_quarantine(tally, QuarantineRow(id=clip.id, dataset=clip.dataset, audio_uri=clip.audio_uri, stage=stage,
                                           reason_code=reason, message=message, created_at=tally.created_at))


def replay_quarantine(tally: ShardTally, row: QuarantineRow) -> None:
    """Record a quarantine row (one made here, or one a clip cache kept from the run that measured
    it: restamped with this run's time), and log it while the budget lasts."""
    if row.created_at != tally.created_at:
        row = row.model_copy(update={"created_at": tally.created_at})
    tally.quarantine.append(row)
    reason, message, stage = row.reason_code, row.message, row.stage
    if reason.value not in tally.examples:
        tally.examples[reason.value] = QuarantineExample(id=row.id, message=message[:EXAMPLE_CHARS])
    # A line per quarantined clip for the first few of each reason, so ops find them from the run's
    # logs; then only counted (a line per shard): 200k log records would take minutes to flush and
    # bloat the Prefect database, and the quarantine Parquet lists every clip anyway.
    if not _log_budget.take(tally.run_id, reason.value):
        tally.unlogged[reason.value] += 1
        return
    where = f"shard {tally.shard:05d}" if tally.shard >= 0 else "measuring"
    log.warning("%s clip %s: quarantined at %s (%s): %s", where, row.id, stage.value,
                reason.value, message if len(message) <= 500 else message[:500] + "…")


class _LogBudget:
    """How many quarantine lines each (run, reason) may still log in this process."""

    def __init__(self, per_reason: int) -> None:
        self.per_reason = per_reason
        self._used: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def take(self, run_id: str, reason: str) -> bool:
        with self._lock:
            if self._used[run_id, reason] >= self.per_reason:
                return False
            self._used[run_id, reason] += 1
            return True


_log_budget = _LogBudget(QUARANTINE_LOG_PER_REASON)
