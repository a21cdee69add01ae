"""The rule table and `check_response`: the first failing enabled rule, in the table's order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import get_args

from schemas.config import QCConfig, QCRule
from tasks.instructions import Instruction, parse_instruction
from tasks.llm.qc.basic import empty, refusal, too_long, too_short, truncated
from tasks.llm.qc.constraints import format_tags
from tasks.llm.qc.context import PASS, QCContext, QCVerdict, Response, seed_attributes
from tasks.llm.qc.contradictions import contradicts_seed
from tasks.llm.qc.injection import injection
from tasks.llm.qc.language import wrong_language
from tasks.llm.qc.leaks import leaks_seed

# rule(response, context) -> its failure (its own code and a detail), or None.
Rule = Callable[[Response, QCContext], QCVerdict | None]

# Cause before symptom: a truncated answer also breaks its format, an injected "OK" is also too
# short, and the more specific reason is the one counted.
RULES: dict[QCRule, Rule] = {
    "empty": empty,
    "truncated": truncated,
    "refusal": refusal,
    "injection": injection,
    "format": format_tags,
    "too_short": too_short,
    "too_long": too_long,
    "wrong_language": wrong_language,
    "leaks_seed": leaks_seed,
    "contradicts_seed": contradicts_seed,
}
RULE_ORDER: tuple[QCRule, ...] = tuple(RULES)
assert sorted(RULE_ORDER) == sorted(get_args(QCRule)), "RULES must name every QC rule once"


def check_response(response: str, *, seed_description: str, attributes: Mapping[str, str] | None = None,
                   transcript: str | None = None, instruction: Instruction | str | None = None,
                   finish_reason: str | None = None, config: QCConfig | None = None) -> QCVerdict:
    """The first failing enabled rule (in RULE_ORDER) for this response, or ok.

    `attributes` are the seed's display label → word (`{"Gender": "Female"}`); when empty they are
    read back from the seed's trailing "(Label: value, …)". `instruction` may be a pool line
    (tags are parsed) or an already parsed Instruction.
    """
    config = config or QCConfig()
    if not config.enabled:
        return PASS
    if instruction is None or isinstance(instruction, str):
        instruction = parse_instruction(instruction or "")
    attrs = dict(attributes) if attributes else seed_attributes(seed_description)
    ctx = QCContext(seed=seed_description, attributes=attrs, transcript=transcript, instruction=instruction,
                    finish_reason=finish_reason, config=config)
    r = Response.of(response or "", transcript)
    enabled = set(config.rules)
    for code, rule in RULES.items():
        if code not in enabled:
            continue
        if code != "empty" and not r.text:
            continue  # nothing else is meaningful on an empty response (e.g. "empty" switched off)
        failure = rule(r, ctx)
        if failure is not None:
            return failure
    return PASS
