"""The replicas of an OpenAI-compatible endpoint (`llm.base_url` + `llm.base_urls`, e.g. one `vllm
serve` per GPU): which one gets the next attempt, and which ones sit out after a connection failure.

Every attempt goes to the replica with the fewest requests in flight from this backend, round robin
among ties. A replica that fails with a connection error is benched for a cool-off (1 s, doubling per
consecutive failure, at most 30 s); a success ends its bench. Thread-safe: one backend may be used by
several shard threads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Replica:
    base_url: str
    in_flight: int = 0
    failures: int = 0  # consecutive connection failures
    down_until: float = 0.0  # monotonic time until which the replica is skipped


class ReplicaSet:
    """Load spreading and cool-off over a fixed list of base URLs."""

    # A replica with a connection error is skipped for cooldown_s * 2**(failures-1) seconds (capped).
    cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0

    def __init__(self, base_urls: Sequence[str]) -> None:
        self.replicas = [Replica(u) for u in base_urls]
        self._rr = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.replicas)

    def base_url(self, index: int) -> str:
        return self.replicas[index].base_url

    def pick(self, avoid: set[int]) -> int:
        """Index of the replica for the next attempt (counted in flight until `done`): fewest in flight,
        round robin among ties; replicas in `avoid` (failed this request) or cooling off are skipped
        while others remain."""
        with self._lock:
            n = len(self.replicas)
            now = time.monotonic()
            allowed = [i for i in range(n) if i not in avoid] or list(range(n))
            healthy = [i for i in allowed if self.replicas[i].down_until <= now] or allowed
            low = min(self.replicas[i].in_flight for i in healthy)
            pick = next(i for i in ((self._rr + k) % n for k in range(n))
                        if i in healthy and self.replicas[i].in_flight == low)
            self._rr = (pick + 1) % n
            self.replicas[pick].in_flight += 1
            return pick

    def done(self, index: int, *, connection_failed: bool = False, ok: bool = False) -> None:
        """The attempt on `index` ended: bench the replica after a connection failure, clear its bench
        after a success."""
        with self._lock:
            rep = self.replicas[index]
            rep.in_flight -= 1
            if connection_failed:
                rep.failures += 1
                cool = min(self.max_cooldown_s, self.cooldown_s * 2 ** (rep.failures - 1))
                rep.down_until = time.monotonic() + cool
            elif ok:
                rep.failures = 0
                rep.down_until = 0.0

    def other_healthy(self, avoid: set[int]) -> bool:
        """Whether a replica outside `avoid` is not cooling off (a retry may go there at once)."""
        now = time.monotonic()
        with self._lock:
            return any(i not in avoid and r.down_until <= now for i, r in enumerate(self.replicas))
