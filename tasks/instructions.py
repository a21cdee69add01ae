"""Instructions: the pool of questions asked about clips, their format tags, and which one each clip gets.

A pool is a text file, one instruction a line (blank lines and `#` comments skipped); a line may
start with constraint tags (`[bullets=3][words<=60] Describe…`, grammar in
tasks/resources/instructions_v1.txt). `parse_instruction` strips the tags: only `Instruction.text`
is sent to the LLM, and QC's `format` rule checks the constraints.

A pool is read and every line parsed once, when it is first asked for (`instruction_pool`): the run
calls it before any clip (CLI pre-flight, calibrate, the flow's start), so a malformed tag fails the
run there with an `InstructionPoolError` naming the file, the line and the tag, never halfway through
a corpus. Each clip's instruction is a deterministic pick (seed, clip id), so a re-run or a resumed
shard asks the same question; the pool's hash is recorded in every version's lineage.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from schemas.config import DEFAULT_INSTRUCTION, ConfigError, DescribeConfig
from tasks.describe import stable_int

__all__ = [
    "BUILTIN_POOL",
    "Constraint",
    "ConstraintKind",
    "Instruction",
    "InstructionPoolError",
    "builtin_pool_path",
    "instruction_pool",
    "load_instruction_pool",
    "parse_instruction",
    "parse_pool",
    "pick_instruction",
    "pool_hash",
]

BUILTIN_POOL = "instructions_v1.txt"  # `describe.instruction_pool: builtin`

ConstraintKind = Literal["json", "bullets", "sentences", "words"]
_COUNT_KINDS = ("bullets", "sentences", "words")


class InstructionPoolError(ConfigError):
    """A pool (or `describe.instruction`) that cannot run: missing, empty, or a malformed tag.

    A ConfigError, so every pre-flight reports it as a usage error before any work."""


@dataclass(frozen=True)
class Constraint:
    """One machine-checkable constraint. Counts are inclusive bounds; None = unbounded."""

    kind: ConstraintKind
    lo: int | None = None
    hi: int | None = None
    keys: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        if self.kind == "json":
            return f"[json={','.join(self.keys)}]" if self.keys else "[json]"
        if self.lo is not None and self.lo == self.hi:
            return f"[{self.kind}={self.lo}]"
        if self.lo is not None and self.hi is not None:
            return f"[{self.kind}={self.lo}-{self.hi}]"
        if self.hi is not None:
            return f"[{self.kind}<={self.hi}]"
        return f"[{self.kind}>={self.lo}]"

    def allows(self, n: int) -> bool:
        return (self.lo is None or n >= self.lo) and (self.hi is None or n <= self.hi)

    def bounds_text(self) -> str:
        if self.lo is not None and self.lo == self.hi:
            return f"exactly {self.lo}"
        if self.lo is not None and self.hi is not None:
            return f"{self.lo} to {self.hi}"
        return f"at most {self.hi}" if self.hi is not None else f"at least {self.lo}"


@dataclass(frozen=True)
class Instruction:
    """An instruction as sent to the LLM (`text`, tags stripped) and the constraints QC checks."""

    text: str
    constraints: tuple[Constraint, ...] = ()
    tags: str = ""

    @property
    def line(self) -> str:
        """The pool line this came from (tags + text)."""
        return f"{self.tags} {self.text}" if self.tags else self.text

    def constraint(self, kind: ConstraintKind) -> Constraint | None:
        return next((c for c in self.constraints if c.kind == kind), None)


# ------------------------------------------------------------------------------------------------
# Tags
# ------------------------------------------------------------------------------------------------

_TAG = re.compile(r"\[\s*([a-z_]+)\s*(?:(<=|>=|=)\s*([^\]]*?))?\s*\]")
_TAG_PREFIX = re.compile(r"^\s*((?:\[\s*[a-z_]+\s*(?:(?:<=|>=|=)[^\]]*)?\]\s*)+)(.*)$", re.DOTALL)


def _int(value: str, tag: str) -> int:
    if not re.fullmatch(r"\d{1,5}", value.strip()):
        raise ValueError(f"instruction tag {tag}: expected a whole number, got {value!r}")
    return int(value)


def _parse_tag(name: str, op: str | None, value: str | None, tag: str) -> Constraint:
    if name == "json":
        if op is None:
            return Constraint("json")
        keys = tuple(k.strip() for k in (value or "").split(",") if k.strip())
        if op != "=" or not keys or any(not re.fullmatch(r"[A-Za-z_][\w-]*", k) for k in keys):
            raise ValueError(f"instruction tag {tag}: use [json] or [json=key1,key2]")
        return Constraint("json", keys=keys)
    if name == "one_sentence":
        if op is not None:
            raise ValueError(f"instruction tag {tag}: [one_sentence] takes no value")
        return Constraint("sentences", 1, 1)
    if name in _COUNT_KINDS:
        kind: ConstraintKind = name  # type: ignore[assignment]
        if op is None or value is None or not value.strip():
            raise ValueError(f"instruction tag {tag}: needs a count, e.g. [{name}=3] or [{name}<=3]")
        if op == "=" and "-" in value:
            low, _, high = value.partition("-")
            lo, hi = _int(low, tag), _int(high, tag)
            if lo > hi:
                raise ValueError(f"instruction tag {tag}: range {lo}-{hi} is empty")
            return Constraint(kind, lo, hi)
        n = _int(value, tag)
        if op == "=":
            return Constraint(kind, n, n)
        return Constraint(kind, None, n) if op == "<=" else Constraint(kind, n, None)
    raise ValueError(f"instruction tag {tag}: unknown tag {name!r}; known: json, bullets, sentences, "
                     "one_sentence, words")


@lru_cache(maxsize=4096)  # asked once per clip; a pool holds a few hundred lines
def parse_instruction(line: str) -> Instruction:
    """`"[bullets=3][words<=60] Describe…"` → Instruction("Describe…", (bullets 3, words ≤ 60), tags).

    A line that does not start with a tag is a plain instruction without constraints (DeSTA2's
    fixed instruction, or a config's `describe.instruction`). Unknown or malformed tags raise
    ValueError.
    """
    text = " ".join(str(line).split())
    match = _TAG_PREFIX.match(text)
    if not match:
        return Instruction(text=text)
    tags_text, rest = match.group(1), match.group(2).strip()
    constraints: list[Constraint] = []
    for tag in _TAG.finditer(tags_text):
        c = _parse_tag(tag.group(1), tag.group(2), tag.group(3), tag.group(0))
        if any(prev.kind == c.kind for prev in constraints):
            raise ValueError(f"instruction {text!r}: more than one {c.kind} tag")
        constraints.append(c)
    if not rest:
        raise ValueError(f"instruction {text!r}: tags but no instruction text")
    return Instruction(text=rest, constraints=tuple(constraints), tags="".join(c.tag for c in constraints))


def _is_instruction(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def parse_pool(lines: Iterable[str], source: str = "instruction pool") -> tuple[Instruction, ...]:
    """Every instruction of a pool's lines (comments/blank lines skipped); all tag errors reported at
    once, each with its line number (counted over every line given, comments included)."""
    out: list[Instruction] = []
    errors: list[str] = []
    for n, line in enumerate(lines, 1):
        if not _is_instruction(line):
            continue
        try:
            out.append(parse_instruction(line))
        except ValueError as exc:
            errors.append(f"line {n}: {exc}")
    if errors:
        raise InstructionPoolError(f"{source} has bad tags:\n" + "\n".join(errors))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Pools
# ------------------------------------------------------------------------------------------------


def builtin_pool_path(name: str = BUILTIN_POOL) -> str:
    """Filesystem path of a pool shipped in tasks/resources."""
    return str(resources.files("tasks.resources").joinpath(name))


@lru_cache(maxsize=8)
def load_instruction_pool(path: str | None) -> tuple[str, ...]:
    """The instruction lines of the pool file at `path`, every tag checked; default: DeSTA2's one.

    Raises InstructionPoolError naming the file (and the line and tag of each malformed one)."""
    if path is None:
        return (DEFAULT_INSTRUCTION,)
    p = Path(path)
    if not p.is_file():
        raise InstructionPoolError(f"describe.instruction_pool: no file at {path}")
    lines = p.read_text(encoding="utf-8").splitlines()
    parse_pool(lines, source=f"describe.instruction_pool {path}")
    pool = tuple(line.strip() for line in lines if _is_instruction(line))
    if not pool:
        raise InstructionPoolError(f"describe.instruction_pool: {path} has no instructions")
    return pool


@lru_cache(maxsize=8)
def _single(instruction: str) -> tuple[str, ...]:
    parse_pool([instruction], source="describe.instruction")
    return (instruction,)


def instruction_pool(config: DescribeConfig) -> tuple[str, ...]:
    """The configured pool: a file, `builtin` (the shipped, versioned pool), or the single instruction."""
    if config.instruction_pool == "builtin":
        return load_instruction_pool(builtin_pool_path())
    return load_instruction_pool(config.instruction_pool) if config.instruction_pool else _single(config.instruction)


def pool_hash(pool: Sequence[str]) -> str:
    """What the lineage records: the pool's instruction lines, as written, hashed."""
    return hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16]


def pick_instruction(pool: Sequence[str], seed: int, clip_id: str) -> str:
    """Deterministic per (seed, clip id): re-runs and resumed shards ask the same question."""
    return pool[stable_int(seed, clip_id) % len(pool)]
