"""Live progress of a run as ops read it: counts so far, throughput and an ETA.

One meter feeds both views: the flow's `shard-progress` artifact in the Prefect UI (moved as each
shard finishes) and the CLI's terminal bar (moved as each batch of clips finishes).

Throughput leaves start-up out (Prefect, preflight, model loading, planning): the clock starts when
the flow submits the shard tasks (`start`), or, for the terminal bar, at the first finished batch,
whose clips then count as already done at that instant. Shards an earlier attempt finished count as
done but never as throughput, or a resumed run would report an absurd rate and a zero ETA.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping


def duration_text(seconds: float) -> str:
    """42 → '42 s', 200 → '3 min 20 s', 7500 → '2 h 05 min'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressMeter:
    """Counts of one run so far, and the rates measured since the clock started (thread-safe)."""

    def __init__(self, clips_total: int = 0, shards_total: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clips_total = clips_total
        self.shards_total = shards_total
        self._clock = clock
        self._lock = threading.Lock()
        self.clips_done = 0
        self.rows = 0
        self.shards_done = 0
        self.shards_reused = 0
        self.audio_seconds = 0.0
        self.by_reason: Counter[str] = Counter()
        self.recordings_cut = 0  # long recordings cut into segments so far, and those segments
        self.segments = 0
        self.quarantined = 0  # quarantine rows: clips, recordings that failed whole, and segments
        self._processed = 0  # clips finished by this launch (not reused)
        self._processed_audio = 0.0
        self._t0: float | None = None
        self._base = 0  # processed clips already finished when the clock started
        self._base_audio = 0.0

    def start(self) -> None:
        """Start the rate clock now (the flow: shard tasks submitted, start-up behind it)."""
        with self._lock:
            self._t0, self._base, self._base_audio = self._clock(), self._processed, self._processed_audio

    def add(self, clips: int, rows: int, *, reused: bool = False, shard: bool = False,
            by_reason: Mapping[str, int] | None = None, audio_seconds: float = 0.0,
            recordings_cut: int = 0, segments: int = 0, quarantined: int | None = None) -> None:
        """`clips` more planned clips finished, giving `rows` rows and `quarantined` quarantine rows;
        `recordings_cut` recordings were cut into `segments` segments; `shard`: a shard ended.

        `quarantined` unset: what a whole shard's (or whole clips') counts imply by the shard check's
        identity, rows + quarantined = clips - recordings_cut + segments. A batch of the terminal bar
        passes it: mid-shard, a recording's segments are cut before they all come out."""
        if quarantined is None:
            quarantined = max(0, clips - recordings_cut + segments - rows)
        with self._lock:
            self.clips_done += clips
            self.rows += rows
            self.quarantined += quarantined
            self.recordings_cut += recordings_cut
            self.segments += segments
            self.audio_seconds += audio_seconds
            self.by_reason.update(by_reason or {})
            if shard:
                self.shards_done += 1
                self.shards_reused += reused
            if reused:
                return
            self._processed += clips
            self._processed_audio += audio_seconds
            if self._t0 is None:  # no explicit start: the first finished batch starts the clock
                self._t0, self._base, self._base_audio = self._clock(), self._processed, self._processed_audio

    def _elapsed(self) -> float | None:
        if self._t0 is None:
            return None
        elapsed = self._clock() - self._t0
        return elapsed if elapsed > 0 and self._processed > self._base else None

    def clips_per_s(self) -> float | None:
        """Clips finished per second since the clock started; None until it can be measured."""
        elapsed = self._elapsed()
        return None if elapsed is None else (self._processed - self._base) / elapsed

    def audio_hours_per_hour(self) -> float | None:
        """Hours of audio turned into rows per wall-clock hour (the field's usual throughput unit)."""
        elapsed = self._elapsed()
        return None if elapsed is None else (self._processed_audio - self._base_audio) / elapsed

    def eta_s(self) -> float | None:
        """Seconds until every clip is done at the measured rate: 0 when done, None when unknown."""
        if self.clips_total and self.clips_done >= self.clips_total:
            return 0.0
        rate = self.clips_per_s()
        if not rate:
            return None
        return max(0, self.clips_total - self.clips_done) / rate

    def percent(self) -> float:
        return round(100.0 * self.clips_done / self.clips_total, 2) if self.clips_total else 100.0

    def _eta_text(self) -> str:
        eta = self.eta_s()
        return "unknown (measured once clips finish)" if eta is None else duration_text(eta)

    def fields(self) -> list[tuple[str, str]]:
        """What ops read, in order: (name, value) pairs, one row per quarantine reason so far."""
        rate, hours = self.clips_per_s(), self.audio_hours_per_hour()
        out = [
            ("shards done", f"{self.shards_done}/{self.shards_total}"),
            *([("shards reused", f"{self.shards_reused} (finished by an earlier attempt)")]
              if self.shards_reused else []),
            ("clips done", f"{self.clips_done}/{self.clips_total}"),
            ("rows", str(self.rows)),
            *([("recordings cut", f"{self.recordings_cut} → {self.segments} segments")] if self.recordings_cut else []),
            ("quarantined", str(self.quarantined)),
            *((f"quarantined: {reason}", str(n)) for reason, n in sorted(self.by_reason.items())),
            ("audio hours", f"{self.audio_seconds / 3600:.4f}"),
            ("clips/s", "unknown" if rate is None else f"{rate:.2f}"),
            ("audio hours per hour", "unknown" if hours is None else f"{hours:.2f}"),
            ("ETA", self._eta_text()),
        ]
        return out

    def markdown(self, title: str) -> str:
        """A two-column table (what the UI's artifact card renders live, as its description)."""
        lines = [f"**{title}**: {self.percent():.0f}% of clips, ETA {self._eta_text()}", "",
                 "| progress | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.fields()]
        return "\n".join(lines)

    def postfix(self) -> str:
        """The terminal bar's compact tail: rows, quarantined, recordings cut and their segments (when
        there are any), rate, ETA."""
        rate = self.clips_per_s()
        eta = self.eta_s()
        cut = f"cut {self.recordings_cut} recordings → {self.segments} segments, " if self.recordings_cut else ""
        return (f"rows {self.rows}, quarantined {self.quarantined}, {cut}"
                + ("rate pending" if rate is None else f"{rate:.1f} clips/s")
                + ("" if eta is None else f", ETA {duration_text(eta)}"))
