"""Regeneration under QC: generate a batch, check every answer as it arrives, ask again with a new seed
for the ones that fail, and quarantine what still fails after `llm.qc.max_regenerations`.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from schemas.config import QCConfig, RunConfig
from schemas.records import QuarantineError, ReasonCode, Stage
from tasks.describe import stable_int
from tasks.llm import LLMBackend, LLMResult
from tasks.llm.base import OnResult, generate_reporting
from tasks.llm.qc import QCVerdict, check_response
from tasks.rows import Prepared


def qc_rules(config: RunConfig) -> QCConfig:
    """The QC config in force: the `rules` backend ignores instructions, so `format` is moot there."""
    qc = config.llm.qc
    if config.llm.backend_name == "rules" and "format" in qc.rules:
        return qc.model_copy(update={"rules": [r for r in qc.rules if r != "format"]})
    return qc


def generate_with_qc(prepared: list[Prepared], backend: LLMBackend, config: RunConfig,
                     failures: Counter[str]) -> list[LLMResult | QuarantineError]:
    """Generate, check every response, regenerate the failed ones with a new seed, then quarantine.

    `failures` counts every QC failure by rule, regenerated ones included.
    """
    qc = qc_rules(config)
    final: list[LLMResult | QuarantineError | None] = [None] * len(prepared)
    verdicts: dict[int, QCVerdict] = {}
    pending = list(range(len(prepared)))
    for attempt in range(qc.max_regenerations + 1 if qc.enabled else 1):
        requests = [prepared[i].request if attempt == 0 else prepared[i].request.model_copy(
            update={"seed": stable_int(prepared[i].request.seed, "regenerate", attempt) % (2**31)})
            for i in pending]
        early: dict[int, tuple[str, QCVerdict]] = {}
        results = generate_reporting(backend, requests, _checker([prepared[i] for i in pending], qc, early)) \
            if qc.enabled else backend.generate(requests)
        still: list[int] = []
        for j, (i, result) in enumerate(zip(pending, results, strict=True)):
            if isinstance(result, QuarantineError) or not qc.enabled:
                final[i] = result
                continue
            seen = early.get(j)
            verdict = seen[1] if seen is not None and seen[0] == result.text else _check(prepared[i], result, qc)
            if verdict.ok and not attempt:
                final[i] = result
            elif verdict.ok:  # the regenerations before this one count as attempts
                gen = result.generation.model_copy(update={"attempts": result.generation.attempts + attempt})
                final[i] = result.model_copy(update={"generation": gen})
            else:
                failures[verdict.reason or "unknown"] += 1
                verdicts[i] = verdict
                still.append(i)
        pending = still
        if not pending:
            break
    for i in pending:
        v = verdicts[i]
        final[i] = QuarantineError(Stage.llm, ReasonCode(f"qc_{v.reason}"),
                                   f"{prepared[i].measured.clip.id}: response failed QC ({v.reason}: {v.detail}) "
                                   f"after {qc.max_regenerations + 1} generations")
    return [r for r in final if r is not None]


def _check(p: Prepared, result: LLMResult, qc: QCConfig) -> QCVerdict:
    # The transcript as the seed shows it (sanitised), not the raw one: what the model could quote.
    return check_response(result.text, seed_description=p.seed, attributes=p.attributes,
                          transcript=p.request.transcript, instruction=p.instruction,
                          finish_reason=result.generation.finish_reason, config=qc)


def _checker(batch: list[Prepared], qc: QCConfig, early: dict[int, tuple[str, QCVerdict]]) -> OnResult:
    """An on_result callback that checks each response as it arrives, into `early[index]`, while the
    rest of the batch is still generating: checking a whole batch after it returns left the model
    server idle meanwhile (docs/decisions.md). A check that raises is left for the caller to repeat
    after the batch, so the batch itself never fails here."""
    def check(j: int, result: LLMResult | QuarantineError) -> None:
        if isinstance(result, LLMResult):
            with contextlib.suppress(Exception):
                early[j] = (result.text, _check(batch[j], result, qc))
    return check
