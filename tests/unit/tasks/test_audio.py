import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import tasks.audio
from schemas.config import AudioConfig, RunConfig, SourceConfig
from schemas.records import Clip, QuarantineError, Stage
from tasks.audio import encode_audio, load_audio
from tasks.ingest import iter_refs, load_clip
from tasks.measure import measure_clip as _measure
from tasks.tally import ShardTally as _Acc
from tests.support.corrupt_zoo import build_zoo, ffmpeg_encode

CFG = AudioConfig()


def _clip(path: Path) -> Clip:
    return Clip(id=f"t/{path.stem}", dataset="t", audio_uri=str(path))


def test_corrupt_zoo_each_clip_gets_its_reason(tmp_path: Path, sample_corpus: Path) -> None:
    """Each zoo clip through the pipeline's own per-clip checks (`_measure`: ingest errors, the
    transcript cap, decode and sample checks, features, the speech check): its exact reason, at its stage."""
    manifest, expected = build_zoo(tmp_path, sample_corpus)
    config = RunConfig(sources=[SourceConfig(path=str(manifest), dataset="zoo")])
    acc = _Acc()
    seen: dict[str, str | None] = {}
    for ref in iter_refs(config.sources):
        clip = load_clip(ref, config.sources)
        local = clip.id.split("/", 1)[1]
        before = len(acc.quarantine)
        measured = _measure(clip, config, acc)
        if measured is not None:
            audio = measured.audio
            assert audio.sampling_rate == 16000 and audio.samples.dtype == np.float32
            assert audio.samples.ndim == 1
            # A DC offset 40 dB or more below the peak is gone (speech_dc_offset had 0.3 under a 0.65 peak).
            assert abs(float(np.mean(audio.samples))) < 0.01 * float(np.max(np.abs(audio.samples))), local
            seen[local] = None
            continue
        assert len(acc.quarantine) == before + 1
        q = acc.quarantine[-1]
        assert q.stage is STAGE_OF.get(q.reason_code.value, Stage.audio), (local, q.stage)
        if q.stage is not Stage.ingest or q.reason_code.value == "transcript_too_long":
            assert q.message.startswith(f"{clip.audio_uri}: ")  # names the file
        assert "object at 0x" not in q.message and "@ 0x" not in q.message  # no Python/C reprs
        seen[local] = q.reason_code.value
    bad_json = [k for k in seen if k.startswith("row@")]
    assert len(bad_json) == 1 and seen.pop(bad_json[0]) == "bad_row"
    assert seen == expected
    assert len([v for v in expected.values() if v]) >= 13


STAGE_OF = {"bad_row": Stage.ingest, "transcript_too_long": Stage.ingest}


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
    sf.write(tmp_path / "a.wav", 0.1 * np.sin(np.arange(8000, dtype=np.float32) / 5.0), 16000)
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(tmp_path / "a.wav"), AudioConfig(min_duration_s=0.6))
    assert err.value.reason.value == "too_short" and "audio.min_duration_s=0.6" in err.value.message
    assert load_audio(_clip(tmp_path / "a.wav"), AudioConfig(min_duration_s=0.4)).duration_s == 0.5


def test_dc_offset_is_removed_and_pure_dc_is_silent(tmp_path: Path, sample_corpus: Path) -> None:
    ref = load_audio(_clip(sample_corpus / "audio" / SLT), CFG)
    sf.write(tmp_path / "dc.wav", ref.samples + np.float32(0.4), 16000, subtype="FLOAT")
    shifted = load_audio(_clip(tmp_path / "dc.wav"), CFG)
    assert abs(float(np.mean(shifted.samples))) < 1e-5  # the offset is gone before anything is measured
    assert np.max(np.abs(shifted.samples - ref.samples)) < 1e-3  # and only the offset: the speech is intact
    # 0.4 + a 0.65 peak reaches 1.05: clipping is measured on the samples as stored, offset included.
    stored = np.abs(ref.samples + np.float32(0.4))
    assert shifted.clipping_ratio == pytest.approx(float(np.mean(stored >= 0.999))) and shifted.clipping_ratio > 0
    sf.write(tmp_path / "pure.wav", np.full(16000, -0.5, dtype=np.float32), 16000)
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(tmp_path / "pure.wav"), CFG)
    assert err.value.reason.value == "silent" and err.value.stage is Stage.audio
    assert err.value.message == (f"{tmp_path / 'pure.wav'}: peak -inf dBFS after removing a DC offset of -0.5 "
                                 "< audio.silence_dbfs=-60.0")
    # DC plus noise 70 dB below it is silent too, as is the same noise without DC.
    noise = 1e-4 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    for name, signal in (("dc_noise.wav", noise + np.float32(0.3)), ("noise.wav", noise)):
        sf.write(tmp_path / name, signal, 16000, subtype="FLOAT")
        with pytest.raises(QuarantineError) as err:
            load_audio(_clip(tmp_path / name), CFG)
        assert err.value.reason.value == "silent", name


@pytest.mark.parametrize(("scale", "reason"), [(1e30, "out_of_range"), (8.0, "out_of_range"), (3.0, None),
                                               (1.2, None)])
def test_samples_far_beyond_full_scale_are_out_of_range(tmp_path: Path, scale: float, reason: str | None) -> None:
    x = (0.9 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype(np.float32) * np.float32(scale)
    sf.write(tmp_path / "f.wav", x, 16000, subtype="FLOAT")
    if reason is None:  # float WAVs legitimately run a little hot: kept, clipping recorded
        audio = load_audio(_clip(tmp_path / "f.wav"), CFG)
        assert np.max(np.abs(audio.samples)) == pytest.approx(0.9 * scale, rel=1e-3)
        assert audio.clipping_ratio == pytest.approx(float(np.mean(np.abs(x) >= 0.999))) and audio.clipping_ratio > 0.2
        return
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(tmp_path / "f.wav"), CFG)
    assert err.value.reason.value == reason and err.value.stage is Stage.audio
    assert err.value.message.startswith(f"{tmp_path / 'f.wav'}: sample peak ")
    assert "> audio.max_peak=4 (+12 dBFS)" in err.value.message and "normalised" in err.value.message
    # The limit is the config's: raised, the same file decodes.
    assert load_audio(_clip(tmp_path / "f.wav"), AudioConfig(max_peak=1e31)).duration_s == 1.0


def test_a_small_offset_stays_so_digital_silence_stays_zero(tmp_path: Path) -> None:
    """An offset 40 dB below the peak changes no measure; subtracting it would turn exact zeros
    (TTS pauses) into a constant that WADA-SNR reads as noise, so the stored samples keep it."""
    x = np.zeros(16000, dtype=np.float32)
    x[4000:12000] = 0.5 * np.sin(np.arange(8000, dtype=np.float32) / 4.0) + np.float32(0.002)
    sf.write(tmp_path / "tts.wav", x, 16000, subtype="FLOAT")
    audio = load_audio(_clip(tmp_path / "tts.wav"), CFG)
    assert np.array_equal(audio.samples, x) and np.count_nonzero(audio.samples[:4000]) == 0


def test_non_finite_keeps_its_reason_before_the_range_check(tmp_path: Path) -> None:
    x = np.full(16000, 1e30, dtype=np.float32)
    x[5] = np.inf
    sf.write(tmp_path / "i.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(tmp_path / "i.wav"), CFG)
    assert err.value.reason.value == "non_finite" and "1 NaN/Inf samples" in err.value.message


def test_require_speech_uses_min_speech_s() -> None:
    from tasks.audio import require_speech

    require_speech(0.25, "x.wav", CFG)  # above the default 0.2 s: no error
    for found in (None, 0.0, 0.19):
        with pytest.raises(QuarantineError) as err:
            require_speech(found, "x.wav", CFG)
        assert err.value.reason.value == "no_speech" and err.value.stage is Stage.audio
        assert err.value.message.startswith(f"x.wav: the VAD found {found or 0:.2f} s of speech < audio.min_speech_s=0.2")
        assert "sources[].speech: false" in err.value.message
    require_speech(0.0, "x.wav", AudioConfig(min_speech_s=0))  # 0 switches the check off


def test_sample_corpus_clips_all_have_speech(sample_corpus: Path) -> None:
    """Every real clip keeps well above audio.min_speech_s of VAD speech (so none becomes no_speech)."""
    from tasks.features.vad import speech_duration

    found = {}
    for path in sorted((sample_corpus / "audio").iterdir()):
        audio = load_audio(_clip(path), CFG)
        found[path.name] = speech_duration(audio.samples, 16000)
    assert len(found) == 10 and min(found.values()) > 5 * CFG.min_speech_s, found
    assert all(s <= load_audio(_clip(sample_corpus / "audio" / n), CFG).duration_s for n, s in found.items())


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


SLT = "arctic_slt_a0009.wav"  # 3.095 s, 16 kHz mono


def _aligned_correlation(ref: np.ndarray, got: np.ndarray, max_lag: int = 4000) -> tuple[float, int]:
    """Pearson correlation of two 16 kHz signals after the best shift (codec delay / priming)."""
    n = len(ref) + len(got)
    xcorr = np.fft.irfft(np.fft.rfft(got, n) * np.conj(np.fft.rfft(ref, n)), n)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    lag = int(lags[np.argmax(xcorr[lags])])
    a, b = (ref, got[lag:]) if lag >= 0 else (ref[-lag:], got)
    m = min(len(a), len(b))
    return float(np.corrcoef(a[:m], b[:m])[0, 1]), lag


@pytest.mark.parametrize("suffix,args,source_rate,via_ffmpeg", [
    ("m4a", ["-c:a", "aac", "-b:a", "96k"], 16000, True),
    ("aac", ["-c:a", "aac", "-b:a", "96k"], 16000, True),  # raw ADTS: no container header duration
    ("mp4", ["-c:a", "libopus", "-b:a", "48k"], 48000, True),  # Opus in MP4
    ("webm", ["-c:a", "libopus", "-b:a", "48k"], 48000, True),
    ("wma", ["-c:a", "wmav2", "-b:a", "64k"], 16000, True),
    ("opus", ["-c:a", "libopus", "-b:a", "48k"], 16000, False),  # Ogg Opus: libsndfile reads it
])
def test_containers_decode_to_the_source_samples(tmp_path: Path, sample_corpus: Path, suffix: str,
                                                 args: list[str], source_rate: int, via_ffmpeg: bool) -> None:
    src = sample_corpus / "audio" / SLT
    ref = load_audio(_clip(src), CFG)
    path = ffmpeg_encode(src, tmp_path / f"slt.{suffix}", *args)
    if via_ffmpeg:  # the fallback is what is under test: libsndfile must really refuse the file
        with pytest.raises(sf.LibsndfileError):
            sf.info(str(path))
    audio = load_audio(_clip(path), CFG)
    assert audio.sampling_rate == 16000 and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.source_sampling_rate == source_rate and audio.source_channels == 1
    assert abs(audio.duration_s - ref.duration_s) < 0.12, (audio.duration_s, ref.duration_s)
    corr, lag = _aligned_correlation(ref.samples, audio.samples)
    assert corr > 0.98, (suffix, corr, lag)
    assert abs(lag) < 1600  # under 0.1 s of codec delay
    assert audio.sha256 != ref.sha256


def test_stereo_44k_m4a_is_mixed_down_and_resampled(tmp_path: Path, sample_corpus: Path) -> None:
    ref = load_audio(_clip(sample_corpus / "audio" / SLT), CFG)
    stereo = np.stack([ref.samples, np.zeros_like(ref.samples)], axis=1)  # speech left, silence right
    sf.write(tmp_path / "st.wav", stereo, 16000, subtype="FLOAT")
    path = ffmpeg_encode(tmp_path / "st.wav", tmp_path / "st.m4a", "-ar", "44100", "-c:a", "aac", "-b:a", "128k")
    audio = load_audio(_clip(path), CFG)
    assert (audio.source_channels, audio.source_sampling_rate, audio.sampling_rate) == (2, 44100, 16000)
    corr, _ = _aligned_correlation(ref.samples, audio.samples)
    assert corr > 0.95
    # Mixed down by us as the mean of the channels (as for WAV), not by ffmpeg's -3 dB downmix: half level.
    rms = float(np.sqrt(np.mean(audio.samples ** 2)) / np.sqrt(np.mean(ref.samples ** 2)))
    assert rms == pytest.approx(0.5, abs=0.05)


def test_embedded_m4a_bytes_decode_through_a_temporary_file(tmp_path: Path, sample_corpus: Path) -> None:
    path = ffmpeg_encode(sample_corpus / "audio" / SLT, tmp_path / "e.m4a", "-c:a", "aac")
    clip = Clip(id="t/e", dataset="t", audio_uri="hf://corpus/train-0.parquet#row=7", audio_bytes=path.read_bytes())
    audio = load_audio(clip, CFG)
    assert abs(audio.duration_s - 3.095) < 0.12 and audio.source_sampling_rate == 16000
    broken = clip.model_copy(update={"audio_bytes": path.read_bytes()[:2000]})
    with pytest.raises(QuarantineError) as err:
        load_audio(broken, CFG)
    assert err.value.reason.value == "unreadable"
    assert err.value.message.startswith("hf://corpus/train-0.parquet#row=7: ")
    assert "speechpairs-" not in err.value.message  # the temporary file's name is not the clip's


def _sine(seconds: float, dst: Path, *args: str) -> None:
    source = f"sine=frequency=220:duration={seconds}:sample_rate=16000"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", source, *args, str(dst)],
                   check=True, timeout=60)


def test_three_hour_m4a_is_refused_from_its_header(tmp_path: Path) -> None:
    """Stream-copied 3 h file (made in seconds): refused by ffprobe's header, nothing decoded."""
    ten = tmp_path / "ten.m4a"
    _sine(10, ten, "-c:a", "aac", "-b:a", "16k")
    (tmp_path / "list.txt").write_text("file 'ten.m4a'\n" * 1080)
    long = tmp_path / "long.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "concat", "-safe", "0", "-i",
                    str(tmp_path / "list.txt"), "-c", "copy", str(long)], check=True, timeout=120)
    started = time.perf_counter()
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(long), CFG)
    assert time.perf_counter() - started < 15  # decoding 3 h would take far longer on this machine
    assert err.value.reason.value == "too_long"
    assert err.value.message.startswith(f"{long}: 10800.") and "(container header)" in err.value.message
    assert "audio.max_duration_s=30.0" in err.value.message


def test_headerless_stream_is_refused_after_decoding_the_cap_only(tmp_path: Path) -> None:
    """Raw ADTS declares no reliable duration: decoding stops at max_duration_s + 1 s."""
    path = tmp_path / "long.aac"
    _sine(8, path, "-c:a", "aac", "-f", "adts")
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(path), AudioConfig(max_duration_s=5.0))
    assert err.value.reason.value == "too_long" and str(path) in err.value.message
    assert load_audio(_clip(path), AudioConfig(max_duration_s=10.0)).duration_s == pytest.approx(8.0, abs=0.1)


@pytest.mark.parametrize("case", ["moov_missing", "faststart_cut", "text", "no_audio_stream"])
def test_broken_containers_are_quarantined_naming_the_file(tmp_path: Path, sample_corpus: Path, case: str) -> None:
    src = sample_corpus / "audio" / SLT
    path = tmp_path / f"{case}.m4a"
    if case == "text":
        path.write_text("not audio at all, a text file renamed .m4a\n" * 50)
        expect = "not decodable audio"
    elif case == "no_audio_stream":
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=size=32x32:duration=1",
                        "-c:v", "mpeg4", str(path)], check=True, timeout=60)
        expect = "holds no audio stream"
    else:
        flags = ["-movflags", "+faststart"] if case == "faststart_cut" else []
        full = ffmpeg_encode(src, tmp_path / "full.m4a", "-c:a", "aac", *flags).read_bytes()
        path.write_bytes(full[: len(full) // 2])
        expect = "moov atom not found" if case == "moov_missing" else "truncated or corrupt: decoded 1."
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(path), CFG)
    msg = err.value.message
    assert err.value.reason.value == "unreadable" and err.value.stage is Stage.audio
    assert msg.startswith(f"{path}: ") and expect in msg, msg
    assert "@ 0x" not in msg and "file:" not in msg  # no ffmpeg context pointers, no ffmpeg-side path
    assert "re-encode" in msg  # and the fix


def test_a_hung_decoder_is_killed_at_the_timeout(tmp_path: Path, sample_corpus: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = ffmpeg_encode(sample_corpus / "audio" / SLT, tmp_path / "t.m4a", "-c:a", "aac")
    monkeypatch.setattr(tasks.audio, "PROBE_TIMEOUT_S", 0.001)  # no real ffprobe finishes in 1 ms
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(path), CFG)
    assert err.value.reason.value == "unreadable"
    assert err.value.message.startswith(f"{path}: ffprobe did not finish within 0.001 s")


def test_libsndfile_errors_carry_no_python_repr(tmp_path: Path) -> None:
    """libsndfile opens a cut FLAC (header intact) but fails reading it: the message keeps libsndfile's
    own words and the file name (an open failure's str() holds a BytesIO repr: see the zoo test)."""
    sf.write(tmp_path / "full.flac", 0.3 * np.sin(np.arange(48000) / 5.0), 16000)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 3])
    with pytest.raises(QuarantineError) as err:
        load_audio(_clip(tmp_path / "cut.flac"), CFG)
    assert err.value.reason.value == "unreadable"
    assert err.value.message.startswith(f"{tmp_path / 'cut.flac'}: decoding failed (")
    assert "object at 0x" not in err.value.message and "BytesIO" not in err.value.message
