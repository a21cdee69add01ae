"""The attribute vocabulary of seed descriptions: config key → label written in the seed, and the
corpus labels a source writes into the seed next to them (`SeedLabel`)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

# Order here is only the catalogue; the seed uses the order given in `describe.attributes`.
ATTRIBUTE_LABELS: dict[str, str] = {
    "gender": "Gender",
    "emotion": "Emotion",
    "age": "Age",
    "accent": "Accent",
    "pitch": "Pitch",
    "speed": "Speaking speed",
    "volume": "Volume",
    "noise": "Noise level",
    "reverb": "Reverberation",
    "duration": "Duration",
}

KNOWN_ATTRIBUTES = frozenset(ATTRIBUTE_LABELS)

# Attributes of one speaker's stretch of speech: in a multi-span seed each span carries its own;
# the others (noise, reverb, duration) describe the whole clip.
SPAN_ATTRIBUTES = frozenset({"gender", "emotion", "age", "accent", "pitch", "speed", "volume"})

MAX_DISPLAY_CHARS = 40
# A display name sits inside the seed's `(Name: value, ...)` list: these would break it.
_DISPLAY_FORBIDDEN = re.compile(r"[:,()\[\]{}<>|\n\r\t]")


def display_name(label: str) -> str:
    """The default display name of a corpus label: `first_language` → `First language`."""
    text = " ".join(str(label).replace("_", " ").split())
    return text[:1].upper() + text[1:]


class SeedLabel(BaseModel):
    """One corpus label (a key of the clip's `labels`) written into the seed as `Display: value`.

    In YAML: `"act"` (display name `Act`), `"act: Dialogue act"`, or a mapping
    `{label: act, as: Dialogue act, values: {inf: Inform, "?": ""}}`; `values` maps a raw value to
    the word written (an empty word leaves the label out for that clip), other values stay verbatim.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, description="The corpus label (a key of the clip's labels).")
    display: str = Field(default="", validation_alias=AliasChoices("as", "display"), description="Name written in the seed; default: the "
                         "label with underscores as spaces and a capital first letter.")
    values: dict[str, str] | None = Field(default=None, description="Raw value → word written ('' = omit).")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        """`"act"` or `"act: Act"` → the mapping form."""
        if isinstance(data, str):
            label, sep, shown = data.partition(":")
            if sep and not shown.strip():
                raise ValueError(f"{data!r}: nothing after ':'; write 'label: Display name' or just 'label'")
            return {"label": label.strip(), "as": shown.strip()} if sep else {"label": data.strip()}
        return data

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("label must name a corpus label (e.g. act, sentiment, intensity)")
        return value

    @model_validator(mode="after")
    def _display(self) -> SeedLabel:
        shown = " ".join(self.display.split()) or display_name(self.label)
        bad = sorted(set(_DISPLAY_FORBIDDEN.findall(shown)))
        if bad:
            raise ValueError(f"display name {shown!r} (label {self.label!r}) may not contain {bad}: it is "
                             "written inside the seed's '(Name: value, ...)' list; set `as:` to a plain name")
        if len(shown) > MAX_DISPLAY_CHARS:
            raise ValueError(f"display name {shown!r} is longer than {MAX_DISPLAY_CHARS} characters")
        if not any(ch.isalpha() for ch in shown):
            raise ValueError(f"display name {shown!r} (label {self.label!r}) needs at least one letter")
        object.__setattr__(self, "display", shown)
        return self


def check_seed_labels(entries: list[SeedLabel]) -> list[SeedLabel]:
    """The same display name twice (case-insensitive) would write two values under one name."""
    seen: dict[str, str] = {}
    for entry in entries:
        key = entry.display.lower()
        if key in seen:
            raise ValueError(f"display name {entry.display!r} is used by both {seen[key]!r} and {entry.label!r}; "
                             "give each seed label its own `as:` name")
        seen[key] = entry.label
    return entries
