"""Whisper transcripts (tasks/features/asr.py) with a micro random-weight Whisper built here.

The checkpoint is written in openai-whisper's own format and loaded through `load_transcriber`
→ `whisper.load_model(path)`, so the loading, batching, guard and quarantine code runs for real;
only the words are garbage. Nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from schemas.config import ASRConfig
from schemas.records import QuarantineError, ReasonCode, Stage
from tests.support.paths import REPO, SAMPLE_CORPUS
from tests.support.tiny_models import WHISPER_V3_VOCAB, build_micro_whisper

whisper = pytest.importorskip("whisper")
torch = pytest.importorskip("torch")

from tasks.features.asr import ASRResult, Transcriber, load_transcriber

SR = 16000
SAMPLE_LEN = 8  # tokens per clip: keeps the micro model quick
PERMISSIVE = {"no_speech_threshold": 1.0, "logprob_threshold": -1e9, "compression_ratio_threshold": 1e9}


@pytest.fixture(scope="module")
def micro_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_micro_whisper(tmp_path_factory.mktemp("whisper") / "micro.pt")


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """The sample corpus's real speech (wav/flac/ogg/mp3), 16 kHz mono float32."""
    out = []
    for path in sorted((SAMPLE_CORPUS / "audio").iterdir()):
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SR:
            audio = soxr.resample(audio, sr, SR)
        out.append(np.ascontiguousarray(audio, dtype=np.float32))
    assert len(out) >= 5
    return out


def _load(path: Path, **settings: Any) -> Transcriber:
    config = ASRConfig(enabled=True, model=str(path), device="cpu", **settings)
    return load_transcriber(config, sample_len=SAMPLE_LEN)


class DecodeSpy:
    """Wraps whisper.decode: records batch sizes; raises for batches holding a silent clip."""

    def __init__(self, real: Any, fail_on_silence: bool = False) -> None:
        self.real, self.fail_on_silence = real, fail_on_silence
        self.batches: list[int] = []

    def __call__(self, model: Any, mel: Any, options: Any = None, **kw: Any) -> Any:
        self.batches.append(int(mel.shape[0]))
        if self.fail_on_silence and bool((mel.flatten(1).std(dim=1) == 0).any()):
            raise RuntimeError("boom: injected decoder failure")
        return self.real(model, mel, options, **kw)


def _check_result(result: ASRResult, duration: float) -> None:
    assert isinstance(result, ASRResult)
    assert result.language in whisper.tokenizer.LANGUAGES
    assert all(np.isfinite([result.no_speech_prob, result.avg_logprob, result.compression_ratio]))
    assert result.flagged is None
    for seg in result.segments:
        assert 0.0 <= seg.start_s <= seg.end_s <= min(duration, 30.0) + 1e-6
        assert seg.text.strip()


# -- loading ---------------------------------------------------------------------------------------
def test_load_by_path_records_the_checkpoint(micro_whisper: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    real = whisper.load_model

    def spy(*a: Any, **kw: Any) -> Any:
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(whisper, "load_model", spy)
    tr = _load(micro_whisper)
    assert calls and calls[0][0] == str(micro_whisper)
    assert tr.model_name == f"whisper:{micro_whisper}"
    assert tr.device == "cpu" and tr.fp16 is False
    assert tr.revision is not None and len(tr.revision) == 16


@pytest.mark.parametrize("model", ["/nonexistent/dir/whisper.pt", "./missing.pt", "not-a-whisper-model"])
def test_missing_model_fails_up_front_naming_the_setting(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = DecodeSpy(whisper.decode)
    monkeypatch.setattr(whisper, "decode", spy)
    with pytest.raises(ValueError, match=r"features\.asr\.model"):
        load_transcriber(ASRConfig(enabled=True, model=model, device="cpu"))
    assert spy.batches == []


def test_corrupt_checkpoint_fails_up_front(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"features\.asr\.model: .*not a loadable Whisper checkpoint"):
        load_transcriber(ASRConfig(enabled=True, model=str(bad), device="cpu"))


def test_auto_model_is_small_on_cpu_from_the_download_root(
        micro_whisper: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`auto` without CUDA → whisper.load_model("small", "cpu", download_root) — intercepted, no download."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen: dict[str, Any] = {}
    real = whisper.load_model

    def fake_load(name: str, device: Any = None, download_root: Any = None, **kw: Any) -> Any:
        seen.update(name=name, device=device, download_root=download_root)
        return real(str(micro_whisper), device=device)

    monkeypatch.setattr(whisper, "load_model", fake_load)
    tr = load_transcriber(ASRConfig(enabled=True, download_root=str(tmp_path)), sample_len=SAMPLE_LEN)
    assert seen == {"name": "small", "device": "cpu", "download_root": str(tmp_path)}
    assert tr.model_name == "whisper:small" and tr.device == "cpu" and not tr.fp16


def test_named_model_that_cannot_load_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **kw: Any) -> Any:
        raise OSError("download refused (offline)")

    monkeypatch.setattr(whisper, "load_model", refuse)
    with pytest.raises(ValueError, match=r"features\.asr\.model: cannot load Whisper model 'tiny'.*offline"):
        load_transcriber(ASRConfig(enabled=True, model="tiny", device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_fails_up_front(micro_whisper: Path) -> None:
    with pytest.raises(ValueError, match=r"features\.asr\.device"):
        load_transcriber(ASRConfig(enabled=True, model=str(micro_whisper), device="cuda"))


def test_unknown_language_fails_up_front(micro_whisper: Path) -> None:
    with pytest.raises(ValueError, match=r"features\.asr\.language"):
        _load(micro_whisper, language="klingon")


def test_module_imports_without_whisper_and_says_how_to_install(
        micro_whisper: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import sys; sys.modules['whisper'] = None; import tasks.features.asr; "
            "assert 'torch' not in sys.modules, 'torch imported at module level'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    monkeypatch.setitem(sys.modules, "whisper", None)
    with pytest.raises(ValueError, match=r"openai-whisper is not installed.*speechpairs\[models\]"):
        load_transcriber(ASRConfig(enabled=True, model=str(micro_whisper), device="cpu"))


# -- transcribing ----------------------------------------------------------------------------------
def test_batch_of_real_clips_one_result_each_in_order(micro_whisper: Path, clips: list[np.ndarray]) -> None:
    tr = _load(micro_whisper, batch_size=4, **PERMISSIVE)
    # Bad clips at known places: each must come back as its own asr_error, the rest transcribed.
    bad = {1: np.array([0.1, np.nan, 0.2] * 8000, dtype=np.float32),   # non-finite
           4: np.zeros(31 * SR, dtype=np.float32),                      # longer than 30 s
           6: np.zeros(0, dtype=np.float32),                            # empty
           8: np.zeros((2, SR), dtype=np.float32)}                      # not mono
    batch: list[np.ndarray] = list(clips)
    for i in sorted(bad):
        batch.insert(i, bad[i])
    results = tr.transcribe(batch)
    assert len(results) == len(batch)
    for i, (audio, result) in enumerate(zip(batch, results, strict=True)):
        if i in bad:
            assert isinstance(result, QuarantineError), i
            assert (result.stage, result.reason) == (Stage.asr, ReasonCode.asr_error)
        else:
            _check_result(result, len(audio) / SR)  # type: ignore[arg-type]
            assert result.text  # type: ignore[union-attr]
            assert result.segments  # type: ignore[union-attr]
    messages = {i: results[i].message for i in bad}  # type: ignore[union-attr]
    assert "non-finite" in messages[1] and "31.00 s" in messages[4]
    assert "empty" in messages[6] and "mono" in messages[8]


def test_batched_equals_clip_by_clip(micro_whisper: Path, clips: list[np.ndarray]) -> None:
    batched = _load(micro_whisper, batch_size=16, **PERMISSIVE).transcribe(clips[:5])
    single = _load(micro_whisper, batch_size=1, **PERMISSIVE).transcribe(clips[:5])
    for b, s in zip(batched, single, strict=True):
        assert isinstance(b, ASRResult) and isinstance(s, ASRResult)
        assert (b.text, b.language) == (s.text, s.language)
        assert b.avg_logprob == pytest.approx(s.avg_logprob, abs=1e-4)
        assert b.no_speech_prob == pytest.approx(s.no_speech_prob, abs=1e-4)


def test_batch_size_two_over_five_clips(micro_whisper: Path, clips: list[np.ndarray],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = DecodeSpy(whisper.decode)
    monkeypatch.setattr(whisper, "decode", spy)
    results = _load(micro_whisper, batch_size=2, **PERMISSIVE).transcribe(clips[:5])
    assert spy.batches == [2, 2, 1]  # real batches, one decode call each
    assert len(results) == 5 and all(isinstance(r, ASRResult) for r in results)
    assert _load(micro_whisper).transcribe([]) == []


def test_one_failing_clip_quarantines_only_that_clip(micro_whisper: Path, clips: list[np.ndarray],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spy = DecodeSpy(whisper.decode, fail_on_silence=True)
    monkeypatch.setattr(whisper, "decode", spy)
    batch = [*clips[:2], np.zeros(2 * SR, dtype=np.float32), *clips[2:5]]  # silence → decoder fails
    results = _load(micro_whisper, batch_size=4, **PERMISSIVE).transcribe(batch)
    assert spy.batches == [4, 1, 1, 1, 1, 2]  # the failing batch is retried clip by clip
    assert len(results) == 6
    failed = results[2]
    assert isinstance(failed, QuarantineError)
    assert (failed.stage, failed.reason) == (Stage.asr, ReasonCode.asr_error)
    assert "boom" in failed.message
    assert all(isinstance(r, ASRResult) for i, r in enumerate(results) if i != 2)


GUARDS = [
    ("no_speech", {"no_speech_threshold": 0.0, "logprob_threshold": 0.0}),
    ("repetition", {**PERMISSIVE, "compression_ratio_threshold": 0.5}),
    ("low_logprob", {**PERMISSIVE, "logprob_threshold": 0.0}),
]


@pytest.mark.parametrize(("code", "thresholds"), GUARDS, ids=[g[0] for g in GUARDS])
def test_guards_flag_or_quarantine_with_the_numbers(micro_whisper: Path, clips: list[np.ndarray],
                                                    code: str, thresholds: dict[str, float]) -> None:
    flagged = _load(micro_whisper, batch_size=8, on_hallucination="flag", **thresholds).transcribe(clips[:3])
    quarantined = _load(micro_whisper, batch_size=8, **thresholds).transcribe(clips[:3])
    for f, q in zip(flagged, quarantined, strict=True):
        assert isinstance(f, ASRResult)
        assert f.flagged == code and f.text == "" and f.segments == []
        assert f.language in whisper.tokenizer.LANGUAGES
        assert isinstance(q, QuarantineError)
        assert (q.stage, q.reason) == (Stage.asr, ReasonCode.asr_hallucination)
        assert q.message == f.flag_message and q.message.startswith(code)
        numbers = {"no_speech": [f"{f.no_speech_prob:.3f}", f"{f.avg_logprob:.3f}"],
                   "repetition": [f"{f.compression_ratio:.2f}", "0.5"],
                   "low_logprob": [f"{f.avg_logprob:.3f}", "0.0"]}[code]
        assert all(n in q.message for n in numbers), q.message


def test_language_detected_per_clip_or_forced(micro_whisper: Path, clips: list[np.ndarray]) -> None:
    detected = _load(micro_whisper, **PERMISSIVE).transcribe(clips[:2])
    assert all(isinstance(r, ASRResult) and r.language in whisper.tokenizer.LANGUAGES for r in detected)
    forced = _load(micro_whisper, language="German", **PERMISSIVE).transcribe(clips[:2])
    assert [r.language for r in forced] == ["de", "de"]  # type: ignore[union-attr]


def test_segments_from_timestamp_tokens(micro_whisper: Path) -> None:
    tr = _load(micro_whisper)
    tok = tr.tokenizer

    def ts(seconds: float) -> int:
        return int(tok.timestamp_begin + round(seconds / 0.02))

    tokens = [ts(0.0), *tok.encode(" Hello there."), ts(1.5), ts(1.5), *tok.encode(" General"), ts(2.4),
              *tok.encode(" Kenobi"), ts(9.0)]
    segs = tr._segments(tokens, "Hello there. General Kenobi", duration=3.0)
    assert [(s.start_s, s.end_s, s.text) for s in segs] == [
        (0.0, 1.5, "Hello there."), (1.5, 2.4, "General"), (2.4, 3.0, "Kenobi")]  # clamped to the clip
    # no closing timestamp → the segment runs to the clip's end; no timestamps → one whole-clip segment
    assert [(s.start_s, s.end_s) for s in tr._segments([ts(0.5), *tok.encode(" hi")], "hi", 2.0)] == [(0.5, 2.0)]
    assert [(s.start_s, s.end_s) for s in tr._segments(tok.encode(" hi"), "hi", 2.0)] == [(0.0, 2.0)]
    assert tr._segments([], "", 2.0) == []


def test_large_v3_layout_128_mels(tmp_path: Path, clips: list[np.ndarray]) -> None:
    path = build_micro_whisper(tmp_path / "v3.pt", n_mels=128, n_vocab=WHISPER_V3_VOCAB)
    results = _load(path, batch_size=2, **PERMISSIVE).transcribe(clips[:2])
    for audio, r in zip(clips, results, strict=False):
        _check_result(r, len(audio) / SR)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_batch(micro_whisper: Path, clips: list[np.ndarray]) -> None:
    config = ASRConfig(enabled=True, model=str(micro_whisper), device="auto", batch_size=16,
                       no_speech_threshold=1.0, logprob_threshold=-1e9, compression_ratio_threshold=1e9)
    tr = load_transcriber(config, sample_len=SAMPLE_LEN)
    assert tr.device == "cuda" and tr.fp16
    results = tr.transcribe(clips * 2)
    assert len(results) == 2 * len(clips)
    for audio, r in zip(clips * 2, results, strict=True):
        _check_result(r, len(audio) / SR)  # type: ignore[arg-type]
