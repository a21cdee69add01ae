"""DSP feature extractors: synthetic speech with known ordering, real sample clips, signal identities.

Expected values come from outside the implementation: espeak-ng's pitch/speed parameters, the
sample corpus's known speakers, pure tones, gain changes, added noise at known SNR, pyloudnorm
as an independent BS.1770 implementation, and a Monte-Carlo simulation of the WADA model.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pytest
import soundfile as sf

from schemas.config import FeaturesConfig
from schemas.records import Features
from tasks.features import EXTRACTOR_VERSIONS, extract_features
from tasks.features.gender import PITCH_THRESHOLD_HZ, decide_gender, gender_from_pitch, normalise_gender
from tasks.features.loudness import integrated_loudness, sample_levels
from tasks.features.pitch import estimate_pitch
from tasks.features.rate import count_syllables, speaking_rates, word_syllables, words
from tasks.features.snr import wada_snr, wada_table
from tasks.features.vad import speech_duration
from tests.support.paths import REPO
from tests.support.speech import SR, TEXT, to_16k

CORPUS = REPO / "examples" / "sample_corpus"
MALE_IDS = {"librivox_ss01_0870", "librivox_ss01_0880", "librivox_ss01_0890", "librivox_ss01_0920",
            "librivox_ss01_0930", "arctic_awb_a0007"}
FEMALE_IDS = {"arctic_slt_a0009"}


# --------------------------------------------------------------------------- helpers and fixtures

def tone(freq_hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def assert_clean(features: Features) -> None:
    """Every numeric field is a plain finite float or None."""
    for name, value in features.model_dump().items():
        if isinstance(value, float):
            assert math.isfinite(value), f"{name} = {value}"
        else:
            assert value is None or isinstance(value, str), f"{name} has type {type(value)}"


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict]:
    """Sample-corpus rows by id, each with its 16 kHz `audio` and the `info` soundfile reports."""
    rows = {}
    for line in (CORPUS / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            path = CORPUS / row["path"]
            audio, sr = sf.read(path, dtype="float32")
            rows[row["id"]] = {**row, "audio": to_16k(audio, sr), "info": sf.info(path)}
    return rows


# --------------------------------------------------------------------------- synthetic speech (espeak-ng)

def test_pitch_mean_rises_with_espeak_pitch(espeak) -> None:
    means = [extract_features(espeak("-v", "en", "-p", str(p)), SR, TEXT, {}).pitch_mean_hz
             for p in (10, 30, 50, 70, 90)]
    assert all(m is not None for m in means), means
    assert all(a < b for a, b in pairwise(means)), means


def test_speaking_rate_rises_with_espeak_speed(espeak) -> None:
    feats = [extract_features(espeak("-v", "en", "-s", str(s)), SR, TEXT, {}) for s in (80, 130, 180, 230, 280)]
    wps = [f.speaking_rate_wps for f in feats]
    sps = [f.speaking_rate_sps for f in feats]
    assert all(a < b for a, b in pairwise(wps)), wps
    assert all(a < b for a, b in pairwise(sps)), sps
    for f in feats:  # speech time excludes pauses but cannot exceed the clip
        assert 0 < f.speech_duration_s <= f.duration_s


def test_male_and_female_voices(espeak) -> None:
    male = extract_features(espeak("-v", "en+m3"), SR, TEXT, {})
    female = extract_features(espeak("-v", "en+f3"), SR, TEXT, {})
    assert female.pitch_mean_hz > 1.4 * male.pitch_mean_hz, (male.pitch_mean_hz, female.pitch_mean_hz)
    assert (male.gender, male.gender_source) == ("male", "pitch_heuristic")
    assert (female.gender, female.gender_source) == ("female", "pitch_heuristic")
    assert 0.5 <= male.gender_score <= 1.0 and 0.5 <= female.gender_score <= 1.0


def test_corpus_label_beats_pitch(espeak) -> None:
    audio = espeak("-v", "en+m3")
    assert extract_features(audio, SR, TEXT, {}).gender == "male"
    labelled = extract_features(audio, SR, TEXT, {"gender": "F"})
    assert (labelled.gender, labelled.gender_source, labelled.gender_score) == ("female", "corpus", 1.0)


def test_no_pitch_fallback_when_disabled(espeak) -> None:
    f = extract_features(espeak("-v", "en+f3"), SR, TEXT, {}, FeaturesConfig(gender_from_pitch=False))
    assert f.pitch_mean_hz is not None
    assert (f.gender, f.gender_score, f.gender_source) == (None, None, None)


# --------------------------------------------------------------------------- real sample clips

def test_corpus_clips_features(corpus) -> None:
    for clip_id, row in corpus.items():
        f = extract_features(row["audio"], SR, row.get("transcript"), {})
        assert_clean(f)
        assert f.duration_s == pytest.approx(row["info"].duration, abs=2 / SR), clip_id
        assert 0 < f.speech_duration_s <= f.duration_s, clip_id
        assert 0.1 < f.voiced_ratio < 0.9, clip_id
        assert 70 < f.pitch_mean_hz < 260, (clip_id, f.pitch_mean_hz)
        assert 0 < f.pitch_std_hz < 60, (clip_id, f.pitch_std_hz)
        assert -40 < f.loudness_lufs < -10, (clip_id, f.loudness_lufs)
        assert f.rms_dbfs < f.peak_dbfs, clip_id
        assert 0.0 <= f.clipping_ratio < 0.01, clip_id
        assert -20 <= f.snr_db <= 100, clip_id
        if row.get("transcript"):
            assert 1.0 < f.speaking_rate_wps < 5.0, (clip_id, f.speaking_rate_wps)
            assert f.speaking_rate_sps >= f.speaking_rate_wps, clip_id
        else:
            assert f.speaking_rate_wps is None and f.speaking_rate_sps is None
        assert f.speaking_rate_pps is None and f.c50_db is None


@pytest.mark.parametrize("clip_id", sorted(MALE_IDS | FEMALE_IDS))
def test_corpus_speaker_pitch_and_gender(corpus, clip_id: str) -> None:
    row = corpus[clip_id]
    f = extract_features(row["audio"], SR, row.get("transcript"), {})
    if clip_id in MALE_IDS:
        assert 75 <= f.pitch_mean_hz <= 135, f.pitch_mean_hz
        assert f.gender == "male"
    else:
        assert 170 <= f.pitch_mean_hz <= 220, f.pitch_mean_hz
        assert f.gender == "female"
    assert f.gender_source == "pitch_heuristic"
    # The manifest's own labels (arctic rows carry "gender") take precedence.
    if "gender" in row:
        labelled = extract_features(row["audio"], SR, row.get("transcript"), {"gender": row["gender"]})
        assert (labelled.gender, labelled.gender_source) == (row["gender"], "corpus")


def test_loudness_agrees_with_pyloudnorm(corpus) -> None:
    import pyloudnorm

    meter = pyloudnorm.Meter(SR)
    for clip_id, row in corpus.items():
        reference = meter.integrated_loudness(row["audio"].astype(np.float64))
        assert integrated_loudness(row["audio"], SR) == pytest.approx(reference, abs=0.3), clip_id


# --------------------------------------------------------------------------- loudness and levels

def test_gain_change_moves_loudness(corpus) -> None:
    audio = corpus["arctic_slt_a0009"]["audio"]
    quieter = (audio * 10 ** (-6 / 20)).astype(np.float32)
    before = extract_features(audio, SR, None, {})
    after = extract_features(quieter, SR, None, {})
    assert after.loudness_lufs - before.loudness_lufs == pytest.approx(-6.0, abs=0.5)
    assert after.rms_dbfs - before.rms_dbfs == pytest.approx(-6.0, abs=0.05)
    assert after.peak_dbfs - before.peak_dbfs == pytest.approx(-6.0, abs=0.05)


def test_loudness_of_a_1khz_tone() -> None:
    # BS.1770: the K-filter gain at 1 kHz is ~ +0.69 dB, so a 0 dBFS-peak 1 kHz sine reads about -3.01 LUFS.
    assert integrated_loudness(tone(1000, 2.0, amplitude=1.0), SR) == pytest.approx(-3.01, abs=0.15)


def test_sample_levels() -> None:
    sine = tone(440, 1.0, amplitude=0.5)
    levels = sample_levels(sine)
    assert levels.peak_dbfs == pytest.approx(20 * math.log10(0.5), abs=0.01)
    assert levels.rms_dbfs == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    assert levels.clipping_ratio == 0.0
    clipped = sine.copy()
    clipped[:160] = 1.0
    clipped[160:320] = -1.0
    assert sample_levels(clipped).clipping_ratio == pytest.approx(320 / len(sine))


# --------------------------------------------------------------------------- SNR

def test_snr_falls_as_noise_rises(corpus) -> None:
    audio = corpus["arctic_slt_a0009"]["audio"].astype(np.float64)
    power = float(np.mean(audio**2))
    rng = np.random.default_rng(0)
    true_snrs = (30, 20, 10, 5, 0)
    estimates = []
    for snr in true_snrs:
        noise = rng.standard_normal(len(audio)) * math.sqrt(power / 10 ** (snr / 10))
        estimates.append(extract_features((audio + noise).astype(np.float32), SR, None, {}).snr_db)
    assert all(a > b for a, b in pairwise(estimates)), estimates
    for snr, estimate in zip(true_snrs, estimates):  # a clean studio clip: WADA should be close
        assert estimate == pytest.approx(snr, abs=3.0), (snr, estimate)


def test_wada_table_matches_monte_carlo() -> None:
    """The numerically integrated G-vs-SNR curve agrees with a direct simulation of the model."""
    snr_db, table = wada_table()
    assert np.all(np.diff(table) > 0)
    assert table[0] == pytest.approx(math.log(math.sqrt(2 / math.pi)) + (0.5772156649 + math.log(2)) / 2, abs=0.002)
    rng = np.random.default_rng(1)
    n = 2_000_000
    for snr in (0.0, 10.0, 25.0):
        speech = rng.gamma(0.4, 1.0, n) * rng.choice([-1.0, 1.0], n)
        noisy = np.abs(speech + rng.standard_normal(n) * math.sqrt(0.4 * 1.4 / 10 ** (snr / 10)))
        g_stat = math.log(noisy.mean()) - np.log(noisy).mean()
        assert np.interp(snr, snr_db, table) == pytest.approx(g_stat, abs=0.01), snr


def test_snr_of_pure_noise_is_low() -> None:
    noise = np.random.default_rng(2).standard_normal(SR * 2).astype(np.float32) * 0.1
    assert wada_snr(noise) < 0


# --------------------------------------------------------------------------- pitch

@pytest.mark.parametrize("freq", [80.0, 200.0, 330.0])
def test_pure_tone_pitch(freq: float) -> None:
    f = extract_features(tone(freq, 1.0), SR, None, {})
    assert f.pitch_mean_hz == pytest.approx(freq, rel=0.02)
    assert f.voiced_ratio > 0.8
    assert f.pitch_std_hz < 0.02 * freq


def test_noise_has_no_pitch() -> None:
    noise = np.random.default_rng(3).standard_normal(SR).astype(np.float32) * 0.1
    stats = estimate_pitch(noise, SR)
    assert stats.mean_hz is None and stats.std_hz is None
    assert stats.voiced_ratio < 0.05
    f = extract_features(noise, SR, "some words", {})
    assert f.pitch_mean_hz is None and f.gender is None
    assert_clean(f)


def test_pitch_range_from_config() -> None:
    # A 400 Hz tone is outside a 60-300 Hz search range: no pitch rather than a wrong one.
    f = extract_features(tone(400, 1.0), SR, None, {}, FeaturesConfig(pitch_fmin_hz=60, pitch_fmax_hz=300))
    assert f.pitch_mean_hz is None or abs(f.pitch_mean_hz - 400) > 20


# --------------------------------------------------------------------------- short clips, VAD, rate

def test_short_clip(corpus) -> None:
    audio = corpus["arctic_slt_a0009"]["audio"]
    start = len(audio) // 3
    short = audio[start : start + int(0.35 * SR)]
    f = extract_features(short, SR, "he turned", {})
    assert_clean(f)
    assert f.duration_s == pytest.approx(0.35)
    assert f.loudness_lufs is not None and -50 < f.loudness_lufs < 0
    assert f.speaking_rate_wps is not None


def test_vad_measures_tone_bursts() -> None:
    rng = np.random.default_rng(4)
    gap = np.zeros(SR, dtype=np.float32)
    audio = np.concatenate([gap[: SR // 2], tone(220, 1.0), gap, tone(220, 0.5), gap[: SR // 2]])
    audio += rng.standard_normal(len(audio)).astype(np.float32) * 1e-3  # -60 dBFS noise floor
    assert speech_duration(audio, SR) == pytest.approx(1.5, abs=0.05)


def test_vad_finds_no_speech_in_clicks_silence_or_dc() -> None:
    """What the audit saw become rows: a click in digital silence, pure DC, silence (0 s of speech each)."""
    click = np.zeros(2 * SR, dtype=np.float32)
    click[SR] = 0.9
    burst = np.zeros(2 * SR, dtype=np.float32)
    burst[SR: SR + SR // 50] = tone(1000, 0.02)  # a 20 ms tick: shorter than a speech island
    for name, audio in (("click", click), ("tick", burst), ("digital silence", np.zeros(2 * SR, np.float32)),
                        ("pure DC", np.full(2 * SR, 0.3, np.float32)), ("DC + click", click + np.float32(0.3))):
        assert speech_duration(audio, SR) == 0.0, name


def test_vad_ignores_a_dc_offset(espeak) -> None:
    """The same speech with and without a large DC offset: the same speech time (the offset used to
    lift every frame's energy and hide the pauses)."""
    speech = espeak("-v", "en")
    plain = speech_duration(speech, SR)
    shifted = speech_duration(speech + np.float32(0.5), SR)
    assert 0.5 * len(speech) / SR < plain < len(speech) / SR
    assert shifted == pytest.approx(plain, abs=0.02)


def test_synthetic_speech_keeps_min_speech(espeak) -> None:
    """espeak-ng speech and the zoo's harmonic test signal stay far above audio.min_speech_s (0.2 s)."""
    from schemas.config import AudioConfig
    from tests.support.corrupt_zoo import _tone_speech

    floor = AudioConfig().min_speech_s
    for audio in (espeak("-v", "en"), espeak("-v", "en+f3", "-s", "280"), _tone_speech(1.0), _tone_speech(0.5)):
        assert speech_duration(audio, SR) > 2 * floor


def test_rate_needs_a_transcript(corpus) -> None:
    audio = corpus["cmu_goforward"]["audio"]
    for transcript in (None, "", "  ...  "):
        f = extract_features(audio, SR, transcript, {})
        assert f.speaking_rate_wps is None and f.speaking_rate_sps is None
    assert speaking_rates("four words right here", 2.0) == (2.0, 2.0)


def test_word_and_syllable_counts() -> None:
    assert words("He didn't go -- forward, 10 meters!") == ["He", "didn't", "go", "forward", "10", "meters"]
    dictionary = {"the": 1, "table": 2, "turned": 1, "wanted": 2, "faces": 2, "makes": 1, "beautiful": 3,
                  "meters": 2, "sharply": 2, "gregson": 2, "one": 1, "queen": 1, "clubs": 1, "across": 2}
    for word, syllables in dictionary.items():
        assert word_syllables(word) == syllables, word
    assert count_syllables("he turned sharply and faced gregson across the table") == 13


# --------------------------------------------------------------------------- gender rules

@pytest.mark.parametrize("value", ["f", "F", "female", "Female", "woman", "w", " FEMALE "])
def test_female_labels(value: str) -> None:
    assert normalise_gender(value) == "female"


@pytest.mark.parametrize("value", ["m", "M", "male", "Male", "man"])
def test_male_labels(value: str) -> None:
    assert normalise_gender(value) == "male"


def test_label_keys_and_unknown_values() -> None:
    assert decide_gender({"sex": "M"}, 220.0) == ("male", 1.0, "corpus")
    assert decide_gender({"Gender": "woman"}, 100.0) == ("female", 1.0, "corpus")
    assert decide_gender({"gender": "unknown"}, 100.0)[2] == "pitch_heuristic"
    assert decide_gender({}, None) == (None, None, None)


def test_pitch_heuristic_confidence() -> None:
    assert gender_from_pitch(PITCH_THRESHOLD_HZ * 0.99)[0] == "male"
    assert gender_from_pitch(PITCH_THRESHOLD_HZ * 1.01)[0] == "female"
    assert gender_from_pitch(PITCH_THRESHOLD_HZ)[1] == pytest.approx(0.5)
    scores = [gender_from_pitch(f)[1] for f in (160, 140, 120, 100, 80)]
    assert all(0.5 <= s <= 1.0 for s in scores)
    assert all(a < b for a, b in pairwise(scores)), scores
    scores = [gender_from_pitch(f)[1] for f in (170, 190, 220, 260)]
    assert all(a < b for a, b in pairwise(scores)), scores


def test_extractor_versions_cover_the_extractors() -> None:
    assert {"pitch", "loudness", "snr", "rate", "vad", "gender"} <= set(EXTRACTOR_VERSIONS)
    assert all(isinstance(v, str) and "/" in v for v in EXTRACTOR_VERSIONS.values())
