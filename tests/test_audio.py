import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from schemas.config import AudioConfig, SourceConfig
from schemas.records import Clip, QuarantineError, Stage
from tasks.audio import encode_audio, load_audio
from tasks.ingest import iter_refs, load_clip
from tests.corrupt_zoo import build_zoo

CFG = AudioConfig()


def _clip(path: Path) -> Clip:
    return Clip(id=f"t/{path.stem}", dataset="t", audio_uri=str(path))


def test_corrupt_zoo_each_clip_gets_its_reason(tmp_path: Path, sample_corpus: Path) -> None:
    manifest, expected = build_zoo(tmp_path, sample_corpus)
    sources = [SourceConfig(path=str(manifest), dataset="zoo")]
    seen = {}
    for ref in iter_refs(sources):
        clip = load_clip(ref, sources)
        local = clip.id.split("/", 1)[1]
        if clip.ingest_error:
            seen[local] = clip.ingest_error[0].value
            continue
        try:
            audio = load_audio(clip, CFG)
        except QuarantineError as exc:
            assert exc.stage is Stage.audio
            assert clip.audio_uri in exc.message  # names the file
            seen[local] = exc.reason.value
        else:
            assert audio.sampling_rate == 16000 and audio.samples.dtype == np.float32
            assert audio.samples.ndim == 1
            seen[local] = None
    bad_json = [k for k in seen if k.startswith("row@")]
    assert len(bad_json) == 1 and seen.pop(bad_json[0]) == "bad_row"
    assert seen == expected
    assert len([v for v in expected.values() if v]) >= 9


def test_stereo_8k_is_mixed_down_and_resampled(tmp_path: Path) -> None:
    t = np.arange(8000 * 2) / 8000
    left = 0.5 * np.sin(2 * np.pi * 220 * t)
    sf.write(tmp_path / "s.wav", np.stack([left, -left * 0.0 + left], axis=1), 8000)
    audio = load_audio(_clip(tmp_path / "s.wav"), CFG)
    assert audio.source_sampling_rate == 8000 and audio.source_channels == 2
    assert abs(audio.duration_s - 2.0) < 0.01
    assert audio.samples.shape[0] == pytest.approx(32000, abs=2)
    assert np.max(np.abs(audio.samples)) == pytest.approx(0.5, abs=0.02)


def test_clipping_is_recorded_not_quarantined(tmp_path: Path) -> None:
    x = np.clip(1.5 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000), -1, 1).astype(np.float32)
    sf.write(tmp_path / "c.wav", x, 16000, subtype="FLOAT")
    audio = load_audio(_clip(tmp_path / "c.wav"), CFG)
    assert 0.2 < audio.clipping_ratio < 0.8


def test_thresholds_come_from_config(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", 0.1 * np.ones(8000, dtype=np.float32), 16000)
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(tmp_path / "a.wav"), AudioConfig(min_duration_s=0.6))
    assert err.value.reason.value == "too_short" and "audio.min_duration_s=0.6" in err.value.message
    assert load_audio(_clip(tmp_path / "a.wav"), AudioConfig(min_duration_s=0.4)).duration_s == 0.5


def test_sha256_is_of_source_bytes_and_encode_round_trips(tmp_path: Path, sample_corpus: Path) -> None:
    import hashlib

    rec = json.loads((sample_corpus / "manifest.jsonl").read_text().splitlines()[0])
    path = sample_corpus / rec["path"]
    audio = load_audio(_clip(path), CFG)
    assert audio.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    flac = encode_audio(audio.samples, 16000, "flac")
    back, sr = sf.read(io.BytesIO(flac), dtype="float32")
    assert sr == 16000 and back.shape == audio.samples.shape
    assert np.max(np.abs(back - audio.samples)) < 1e-3


def test_embedded_audio_bytes_are_decoded_without_reading_the_uri(sample_corpus: Path) -> None:
    data = (sample_corpus / "audio" / "arctic_slt_a0009.wav").read_bytes()
    clip = Clip(id="t/x", dataset="t", audio_uri="hf://corpus/train-0.parquet#row=3", audio_bytes=data)
    audio = load_audio(clip, CFG)
    assert abs(audio.duration_s - 3.095) < 0.01
