"""Response quality control: is an LLM answer a usable training target for this clip?

`check_response` runs the enabled rules of `QCConfig.rules` in the order of `RULES` (check.py) and
returns the first failure as a `QCVerdict` with the rule's name as the reason. Each rule is a small
function `rule(response, context) -> failure | None`, in the module of its concern:

  1. empty             no letter or digit at all                                       basic.py
  2. truncated         finish_reason == "length" (cut at max_tokens)                   basic.py
  3. refusal           "as an AI…", "I cannot hear…", "I'm unable to listen…"          basic.py
  4. injection         the response obeys an instruction found in the transcript       injection.py
  5. format            the instruction's constraint tags ([json], [bullets=N], …)      constraints.py
  6. too_short         fewer words than config.min_words (relaxed by a word tag)       basic.py
  7. too_long          more words than config.max_words (raised by a word tag)         basic.py
  8. wrong_language    config.language set: script share + stopword heuristic          language.py
  9. leaks_seed        timestamps, "Label: value" pairs copying the seed, "metadata"…  leaks.py
 10. contradicts_seed  gender, emotion, accent or age the seed rules out               contradictions.py

A rule sees the `Response` (stripped text, JSON object, its own prose: quotes and the transcript
removed) and the `QCContext` (seed, attributes, transcript, instruction, finish reason, config),
both in context.py. Word lists and phrase patterns are data: tasks/resources/qc_lexicon_v1.json
(lexicon.py). Instructions and their tags: tasks/instructions.py.
"""

from tasks.llm.qc.check import RULE_ORDER, RULES, Rule, check_response
from tasks.llm.qc.constraints import count_sentences
from tasks.llm.qc.context import PASS, QCContext, QCVerdict, Response, seed_attributes
from tasks.llm.qc.injection import injection_demands
from tasks.llm.qc.text import count_words, words_of

__all__ = [
    "PASS",
    "RULES",
    "RULE_ORDER",
    "QCContext",
    "QCVerdict",
    "Response",
    "Rule",
    "check_response",
    "count_sentences",
    "count_words",
    "injection_demands",
    "seed_attributes",
    "words_of",
]
