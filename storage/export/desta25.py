"""DeSTA2.5-Audio trainer layout: what the *trained* model sees, plus the target.

That trainer reads one JSON object per line, renders `messages` with the backbone's chat template
and a generation prompt, and appends `response` as the target. So `messages` holds the input only:
an optional system turn and the user turn (instruction + audio locator), never an assistant turn
(it would show the model the answer it must learn), and never the seed description (the trained
model hears the audio instead). The user turn carries `audios: [{"audio": <path relative to the
export root>, "text": <transcript, or " " when none>}]`; the trainer places the transcript next to
the audio features, and asserts one locator per audio.

Defaults follow the trainer's documented example: the instruction, a space, then the locator
wrapped as `<start_audio><|AUDIO|><end_audio>` (its inference code wraps it the same way).
Line keys: `id` (the relative audio path, as in the released DeSTA2.5 data), `dataset`,
`clip_id` (our row id, for joins), `seed_description`, `prompt`, `messages`, `response`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from storage.export.core import AudioFile, RowError

AUDIO_MARKER = "<|AUDIO|>"
AUDIO_START = "<start_audio>"
AUDIO_END = "<end_audio>"
NO_TRANSCRIPT = " "  # what the trainer expects in `text` when a clip has no transcript


def default_system(audio_start: str = AUDIO_START, audio_end: str = AUDIO_END) -> str:
    """Our system turn, naming the tags the clips are wrapped in (the trainer's example does too)."""
    text = "You are a helpful assistant that listens to audio."
    if audio_start and audio_end:
        text += f" Each audio clip is given between {audio_start} and {audio_end} tags."
    return text


class Desta25Options(BaseModel):
    """How the user turn is written (defaults: the trainer's documented example)."""

    model_config = ConfigDict(frozen=True)

    include_system: bool = True
    system: str | None = None  # None: `default_system` for the tags below
    audio_locator: str = AUDIO_MARKER
    audio_start: str = AUDIO_START
    audio_end: str = AUDIO_END
    audio_position: Literal["after", "before"] = "after"  # the wrapped locator after/before the instruction

    @model_validator(mode="after")
    def _locator_once(self) -> Desta25Options:
        if not self.audio_locator.strip():
            raise ValueError("the audio locator must not be empty")
        for name, text in (("system prompt", self.system_text or ""), ("audio start tag", self.audio_start),
                           ("audio end tag", self.audio_end)):
            if self.audio_locator in text:
                raise ValueError(f"the {name} {text!r} contains the audio locator {self.audio_locator!r}: "
                                 "the trainer counts locators to place the audio, so it may appear only once")
        return self

    @property
    def system_text(self) -> str | None:
        """The system turn's content, or None when there is no system turn."""
        if not self.include_system:
            return None
        return self.system if self.system is not None else default_system(self.audio_start, self.audio_end)

    def user_content(self, instruction: str) -> str:
        audio = f"{self.audio_start}{self.audio_locator}{self.audio_end}"
        return f"{instruction} {audio}" if self.audio_position == "after" else f"{audio} {instruction}"


class Desta25Format:
    """`speechpairs datasets export desta`: DEST/<dataset>.jsonl + DEST/audio/…"""

    name: str = "desta"
    columns: tuple[str, ...] = ("dataset", "transcript", "seed_description", "prompt", "response")

    def __init__(self, options: Desta25Options | None = None) -> None:
        self.options = options or Desta25Options()

    def jsonl_name(self, dataset: str) -> str:
        return f"{dataset}.jsonl"

    def record(self, row: dict[str, Any], audio: AudioFile) -> dict[str, Any]:
        opts = self.options
        prompt = row.get("prompt") or ""
        response = row.get("response") or ""
        if not prompt.strip():
            raise RowError("the row has no instruction (`prompt`), so the user turn would be empty")
        if not response.strip():
            raise RowError("the row has no response, the training target")
        if opts.audio_locator in prompt:
            raise RowError(f"the instruction contains the audio locator {opts.audio_locator!r}; export with "
                           "another --audio-locator")
        transcript = row.get("transcript") or ""
        messages: list[dict[str, Any]] = []
        if opts.system_text is not None:
            messages.append({"role": "system", "content": opts.system_text})
        messages.append({"role": "user", "content": opts.user_content(prompt),
                         "audios": [{"audio": audio.path, "text": transcript if transcript.strip() else NO_TRANSCRIPT}]})
        return {
            "id": audio.path,
            "dataset": row.get("dataset"),
            "clip_id": row["id"],
            "seed_description": row.get("seed_description"),
            "prompt": prompt,
            "messages": messages,
            "response": response,
        }
