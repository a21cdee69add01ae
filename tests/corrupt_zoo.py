"""A corpus of good and deliberately broken clips, each with the outcome the pipeline must reach."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000


def _tone_speech(seconds: float, sr: int = SR, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal: speech-like enough for every extractor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    sig = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    return (0.2 * sig * envelope + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def ffmpeg_encode(src: Path, dst: Path, *args: str) -> Path:
    """`dst` encoded from `src` by the ffmpeg binary (container from dst's suffix unless `-f` is given)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *args, str(dst)], check=True,
                   timeout=120)
    return dst


def build_zoo(root: Path, good_corpus: Path) -> tuple[Path, dict[str, str | None]]:
    """Write audio + manifest.jsonl under root; return the manifest and id → expected reason (None = row)."""
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    rows: list[dict[str, object]] = []

    for line in (good_corpus / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        src = good_corpus / rec["path"]
        shutil.copy(src, audio / src.name)
        rec["path"] = f"audio/{src.name}"
        rows.append(rec)
        expected[rec["id"]] = None

    def add(clip_id: str, name: str, reason: str | None, **extra: object) -> None:
        rows.append({"id": clip_id, "path": f"audio/{name}", "transcript": "a test clip", **extra})
        expected[clip_id] = reason

    (audio / "zero.wav").write_bytes(b"")
    add("zero_bytes", "zero.wav", "empty")
    good = (audio / "arctic_slt_a0009.wav").read_bytes()
    (audio / "trunc.wav").write_bytes(good[:30])
    add("truncated_header", "trunc.wav", "unreadable")
    (audio / "text.wav").write_text("this is not audio, just text renamed to .wav\n" * 20)
    add("text_as_wav", "text.wav", "unreadable")
    nan = _tone_speech(1.0)
    nan[100:200] = np.nan
    sf.write(audio / "nan.wav", nan, SR, subtype="FLOAT")
    add("nan_samples", "nan.wav", "non_finite")
    sf.write(audio / "silence.wav", np.zeros(SR * 2, dtype=np.float32), SR)
    add("all_silence", "silence.wav", "silent")
    sf.write(audio / "short.wav", _tone_speech(0.05), SR)
    add("too_short_0_05s", "short.wav", "too_short")
    sf.write(audio / "long.flac", _tone_speech(40.0), SR)
    add("too_long_40s", "long.flac", "too_long")
    stereo = np.stack([_tone_speech(2.0, sr=8000, seed=1), _tone_speech(2.0, sr=8000, seed=2)], axis=1)
    sf.write(audio / "stereo8k.wav", stereo, 8000)
    add("stereo_8k", "stereo8k.wav", None)  # valid: mixed down and resampled, not quarantined
    add("missing_file", "does_not_exist.wav", "missing_file")
    # Containers libsndfile cannot open go through ffmpeg: a good one decodes, broken ones are named.
    ffmpeg_encode(audio / "arctic_slt_a0009.wav", audio / "slt.m4a", "-c:a", "aac", "-b:a", "64k")
    add("m4a_aac", "slt.m4a", None)
    ffmpeg_encode(audio / "arctic_slt_a0009.wav", audio / "slt.webm", "-c:a", "libopus", "-b:a", "32k")
    add("webm_opus", "slt.webm", None)
    m4a = (audio / "slt.m4a").read_bytes()
    (audio / "half.m4a").write_bytes(m4a[:len(m4a) // 2])  # ffmpeg writes the index (moov) last: it is gone
    add("truncated_m4a", "half.m4a", "unreadable")
    (audio / "text.m4a").write_text("this is not audio, just text renamed to .m4a\n" * 20)
    add("text_as_m4a", "text.m4a", "unreadable")
    rows.append({"id": "no_path_column", "transcript": "row without audio"})
    expected["no_path_column"] = "bad_row"

    manifest = root / "manifest.jsonl"
    with manifest.open("w") as f:
        for rec in rows:
            f.write(json.dumps(rec) + "\n")
        f.write("{this line is not json\n")
    return manifest, expected
