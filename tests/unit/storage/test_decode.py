"""Decoding stored audio for the torch loader: dr_flac (miniaudio) where it applies, libsndfile otherwise.

Every decode is checked sample by sample against libsndfile reading the same bytes (an independent
decoder), on FLAC written by sox and by libsndfile, in the stored format (16-bit mono at 16 kHz) and
in each format the fast path must leave to libsndfile.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from schemas.arrow import AUDIO_TYPE

pytest.importorskip("torch")

import storage.torch_batches as tb

SR = 16000


def encoded(samples: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def decoded_batch(data: list[bytes | None], ids: list[str], where: str = "test") -> tuple[Any, Any]:
    """(audio_array, audio_lengths) of the batch mode's conversion of rows holding these bytes."""
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "audio": pa.array([{"bytes": d, "path": f"{i}.flac"} for d, i in zip(data, ids, strict=True)],
                                        AUDIO_TYPE)})
    batch = tb.arrow_to_batch(table, keep=["id"], decode_audio=True, sampling_rate=SR, where=where)
    assert batch["id"] == ids
    return batch["audio_array"], batch["audio_lengths"]


def libsndfile_mono(data: bytes) -> np.ndarray:
    """The reference: libsndfile's float32 samples, channels averaged."""
    samples, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1, dtype=np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    n = int(SR * 1.7)
    speechlike = (0.4 * np.sin(2 * np.pi * 180 * np.arange(n) / SR) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    out = {
        "flac16": encoded(speechlike, SR, "FLAC", "PCM_16"),
        "flac16_full_scale": encoded(np.clip(speechlike * 4, -1, 1), SR, "FLAC", "PCM_16"),
        "flac24": encoded(speechlike, SR, "FLAC", "PCM_24"),
        "flac16_stereo": encoded(np.stack([speechlike, -speechlike[::-1]], axis=1), SR, "FLAC", "PCM_16"),
        "wav16": encoded(speechlike, SR, "WAV", "PCM_16"),
    }
    sox = shutil.which("sox")
    if sox:  # FLAC from another encoder (libFLAC through sox), as a corpus might hold
        path = Path(tmp_path_factory.mktemp("sox")) / "tone.flac"
        subprocess.run([sox, "-n", "-r", str(SR), "-b", "16", "-c", "1", str(path), "synth", "1.3",
                        "sine", "300", "vol", "0.5"], check=True)
        out["sox_flac16"] = path.read_bytes()
    return out


def test_fast_path_takes_only_16_bit_mono_flac_at_the_rate(clips: dict[str, bytes]) -> None:
    assert tb._miniaudio is not None, "miniaudio is a dependency on this platform"
    assert tb.fast_flac_frames(clips["flac16"], SR) == sf.info(io.BytesIO(clips["flac16"])).frames
    if "sox_flac16" in clips:
        assert tb.fast_flac_frames(clips["sox_flac16"], SR) == sf.info(io.BytesIO(clips["sox_flac16"])).frames
    for name in ("flac24", "flac16_stereo", "wav16"):
        assert tb.fast_flac_frames(clips[name], SR) is None, name
    assert tb.fast_flac_frames(clips["flac16"], 8000) is None  # another rate: resampled by libsndfile + soxr
    assert tb.fast_flac_frames(clips["flac16"][:30], SR) is None  # no whole header


@pytest.mark.parametrize("name", ["flac16", "flac16_full_scale", "flac24", "flac16_stereo", "wav16", "sox_flac16"])
def test_decode_equals_libsndfile(clips: dict[str, bytes], name: str) -> None:
    if name not in clips:
        pytest.skip("sox not installed")
    got = tb.decode_audio_bytes(clips[name], SR)
    want = libsndfile_mono(clips[name])
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert np.abs(got).max() > 0.1  # real signal, not zeros


def test_padded_batch_equals_libsndfile_with_and_without_dr_flac(clips: dict[str, bytes],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    names: list[str] = [n for n in ("flac16", "flac24", "wav16", "flac16_stereo", "flac16_full_scale", "sox_flac16")
             if n in clips]
    data = [clips[n] for n in names]
    # A clip at 8 kHz is resampled (soxr) by decode_audio_bytes itself: compare with that.
    data.append(encoded(libsndfile_mono(clips["flac16"])[::2].copy(), SR // 2, "FLAC", "PCM_16"))
    names.append("flac16_8k")
    refs = [libsndfile_mono(d) for d in data[:-1]] + [tb.decode_audio_bytes(data[-1], SR)]
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(tb, "_miniaudio", None)
        padded, lengths = decoded_batch(data, names)
        assert padded.shape == (len(data), max(len(r) for r in refs))
        assert lengths.tolist() == [len(r) for r in refs]
        for i, ref in enumerate(refs):
            row = padded[i].numpy()
            np.testing.assert_array_equal(row[: len(ref)], ref, err_msg=names[i])
            assert not row[len(ref):].any(), names[i]  # zeros past the clip, never stale memory
        results.append(padded)
    assert tb.fast_flac_frames(clips["flac16"], SR) is None  # the second pass really was libsndfile's
    assert (results[0] == results[1]).all()


def test_bad_audio_names_the_row(clips: dict[str, bytes]) -> None:
    good = clips["flac16"]
    corrupt = good[:42] + bytes(len(good) - 42)  # the header of a clip, frames of zeros
    with pytest.raises(RuntimeError, match=r"demo: cannot decode audio of row 'r2'"):
        decoded_batch([good, corrupt], ["r1", "r2"], "demo")
    with pytest.raises(RuntimeError, match=r"cannot decode audio of row 'r3'"):
        decoded_batch([b"not audio"], ["r3"], "demo")
    with pytest.raises(ValueError, match=r"row 'r4' has no stored audio bytes"):
        decoded_batch([good, None], ["r1", "r4"], "demo")
    with pytest.raises(RuntimeError, match=r"cannot decode audio of row 'r5'"):
        tb.decode_or_raise(corrupt, SR, "demo", "r5")
