"""DeSTA2 trainer layout: the JSONL manifest the authors' NeMo recipe reads.

One object per line: `audio_filepath` (relative to the export root, the recipe's `data_root`),
`duration` (seconds, from the written file's header: the recipe loads that much audio),
`transcription` ("" when none), `input` (the instruction), `target` (the LLM's response), plus
`id` (our clip id) and `dataset` for joins. The recipe's chat template puts the audio features
and `transcription` in an `audio` turn and `input` in the `user` turn, so the target never
appears in what the model is shown. The audio file is the row's own clip (never a slice of a
longer source referenced by its path), so `duration` always covers the whole file.
"""

from __future__ import annotations

from typing import Any

from storage.export.core import AudioFile, RowError


class Desta2Format:
    """`speechpairs datasets export desta2`: DEST/<dataset>.desta2.jsonl + DEST/audio/…"""

    name: str = "desta2"
    columns: tuple[str, ...] = ("dataset", "transcript", "prompt", "response")

    def jsonl_name(self, dataset: str) -> str:
        return f"{dataset}.desta2.jsonl"

    def record(self, row: dict[str, Any], audio: AudioFile) -> dict[str, Any]:
        prompt = row.get("prompt") or ""
        response = row.get("response") or ""
        if not prompt.strip():
            raise RowError("the row has no instruction (`prompt`) for the recipe's `input`")
        if not response.strip():
            raise RowError("the row has no response, the training target")
        return {
            "audio_filepath": audio.path,
            "duration": round(audio.duration_s, 6),
            "transcription": row.get("transcript") or "",
            "input": prompt,
            "target": response,
            "id": row["id"],
            "dataset": row.get("dataset"),
        }
