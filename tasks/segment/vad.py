"""Speech regions of a recording streamed in blocks: Silero VAD, or the energy VAD without it.

Why not silero's own `get_speech_timestamps`: it runs the model one 32 ms frame at a time in a
Python loop (~30-40x real time per core here). The model is a per-frame encoder (STFT + four
convolutions: no state) followed by one LSTM cell and a 1x1 output convolution. So the encoder
runs on all frames of a block as one batch, the LSTM cell's weights go into `torch.nn.LSTM`, which
walks the whole block's sequence in one C++ call with the state carried from block to block, and
the output layer is batched again. The probabilities equal the stock streaming model's (to float
rounding) at >300x real time per core, and block joins cost nothing: the state and the 64-sample
context continue exactly. Only the TorchScript weights shipped in the `silero-vad` wheel are used
(no torchaudio, no onnxruntime); torch is imported on first use, never at module import.

Without `silero-vad` the detector is tasks/features/vad.py's energy VAD over the whole
recording's 10 ms frame energies (a few MB for hours), behind the same `FrameDetector` interface.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from tasks.features.vad import drop_short_runs, fill_short_gaps, frame_power, mask_from_power_db

SR = 16_000
SILERO_FRAME = 512  # samples per probability at 16 kHz (32 ms)
SILERO_CONTEXT = 64  # samples of the previous frame the model sees before each frame
ENERGY_FRAME = 160  # 10 ms
Engine = Literal["auto", "silero", "energy"]
VAD_VERSIONS = {"silero": "silero-v6-batched+energy-edges/2", "energy": "energy/2"}


@dataclass(frozen=True)
class VADParams:
    """Hysteresis on frame probabilities (silero's defaults: 0.5 on, 0.15 below that off)."""

    threshold: float = 0.5
    neg_threshold: float | None = None  # default threshold - 0.15
    min_silence_s: float = 0.1  # shorter pauses stay inside a region
    min_speech_s: float = 0.25  # shorter islands are dropped


def silero_available() -> bool:
    """Whether the `silero-vad` wheel (and torch) can be imported, without importing them."""
    return importlib.util.find_spec("silero_vad") is not None and importlib.util.find_spec("torch") is not None


def resolve_engine(engine: Engine = "auto") -> Literal["silero", "energy"]:
    if engine == "auto":
        return "silero" if silero_available() else "energy"
    if engine == "silero" and not silero_available():
        raise RuntimeError("vad engine 'silero' asked for but the silero-vad package is not installed; "
                           "install the `models-cpu` extra (pip install -c constraints.txt silero-vad) or use 'energy'")
    return engine


class FrameDetector(Protocol):
    """Consumes 16 kHz mono blocks in order; `finish` gives (per-frame speech mask, frame seconds)."""

    def feed(self, block: np.ndarray) -> None: ...

    def finish(self, params: VADParams) -> tuple[np.ndarray, float]: ...


def load_silero_jit() -> Any:
    """The TorchScript model shipped in the `silero-vad` wheel, loaded without importing `silero_vad`.

    Why not `silero_vad.load_silero_vad`: importing the package runs its model.py, which calls
    `torch.set_num_threads(1)` for the whole process (Whisper and the classifiers run in the same
    process), and its loader warns (`importlib.resources.path`). The file is found by the package's
    spec, which does not execute the package; torch 2.13's deprecation warning for `torch.jit.load` is
    silenced here only (the wheel's safetensors copy would need the network rebuilt here)."""
    import warnings

    import torch

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (models-cpu extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


class _SileroNet:
    """The 16 kHz Silero network split into its batched parts; weights read from the wheel once."""

    def __init__(self) -> None:
        import torch

        net = load_silero_jit()._model
        self.torch = torch
        self.stft, self.encoder, self.out = net.stft, net.encoder, net.decoder.decoder
        cell = net.decoder.rnn
        self.lstm = torch.nn.LSTM(128, 128)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.lstm, f"{name}_l0").copy_(getattr(cell, name))
        self.lstm.eval()

    def probabilities(self, frames: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """(n, 576) context+frame rows → n probabilities and the LSTM state after the last."""
        torch = self.torch
        with torch.inference_mode():
            features = self.encoder(self.stft(torch.from_numpy(frames))).squeeze(-1)  # (n, 128)
            hidden, state = self.lstm(features.unsqueeze(1), state)
            probs = self.out(hidden.squeeze(1).unsqueeze(-1)).squeeze(1).mean(dim=1)
        return probs.numpy().astype(np.float32, copy=False), state


_NET_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _silero_net() -> _SileroNet:
    with _NET_LOCK:
        return _SileroNet()


class SileroFrames:
    """Silero speech probabilities per 32 ms frame, fed block by block with exact continuity."""

    frame_s = SILERO_FRAME / SR

    def __init__(self) -> None:
        self._net = _silero_net()
        self._pending = np.zeros(0, dtype=np.float32)  # < one frame of samples not yet scored
        self._context = np.zeros(SILERO_CONTEXT, dtype=np.float32)
        self._state: Any = None
        self._probs: list[np.ndarray] = []
        self._energy = EnergyFrames()

    def feed(self, block: np.ndarray) -> None:
        self._energy.feed(block)
        samples = np.concatenate((self._pending, np.asarray(block, dtype=np.float32).reshape(-1)))
        n = len(samples) // SILERO_FRAME
        self._pending = samples[n * SILERO_FRAME:]
        if n:
            self._score(samples[: n * SILERO_FRAME].reshape(n, SILERO_FRAME))

    def _score(self, frames: np.ndarray) -> None:
        rows = np.empty((len(frames), SILERO_CONTEXT + SILERO_FRAME), dtype=np.float32)
        rows[:, SILERO_CONTEXT:] = frames
        rows[0, :SILERO_CONTEXT] = self._context
        rows[1:, :SILERO_CONTEXT] = frames[:-1, -SILERO_CONTEXT:]
        self._context = frames[-1, -SILERO_CONTEXT:].copy()
        probs, self._state = self._net.probabilities(rows, self._state)
        self._probs.append(probs)

    def probabilities(self) -> np.ndarray:
        """All probabilities so far, the trailing partial frame zero-padded (as silero does)."""
        if len(self._pending):
            last = np.zeros((1, SILERO_FRAME), dtype=np.float32)
            last[0, : len(self._pending)] = self._pending
            self._pending = np.zeros(0, dtype=np.float32)
            self._score(last)
        return np.concatenate(self._probs) if self._probs else np.zeros(0, dtype=np.float32)

    def finish(self, params: VADParams) -> tuple[np.ndarray, float]:
        """Silero decides where speech is; each region's edges then move to the energy VAD's edge
        within EDGE_REFINE_S (silero's 32 ms frames start late on quiet onsets, by up to ~0.4 s)."""
        silero = mask_regions(hysteresis(self.probabilities(), params, self.frame_s), self.frame_s)
        edges_mask, edges_frame_s = self._energy.finish(EDGE_PARAMS)
        refined = refine_edges(silero, mask_regions(edges_mask, edges_frame_s), EDGE_REFINE_S)
        return paint_regions(refined, len(edges_mask), edges_frame_s), edges_frame_s


EDGE_REFINE_S = 0.3
EDGE_PARAMS = VADParams(min_silence_s=0.1, min_speech_s=0.03)


def refine_edges(regions: list[tuple[float, float]], edges: list[tuple[float, float]],
                 reach_s: float) -> list[tuple[float, float]]:
    """Each region's start (end) moved to the start (end) of the first (last) `edges` region that
    belongs to it, by at most `reach_s`; regions that then touch are joined.

    An edge region belongs to the region it overlaps most, else to the nearest region within
    `reach_s`; so a region's start never reaches back into the previous utterance's energy across a
    short pause (which joined utterances 0.3 s apart when any edge region in reach could move it).
    Regions that one edge region spans are joined first: sound went on between them."""
    regions = _join_spanned(regions, edges)
    owner: list[list[tuple[float, float]]] = [[] for _ in regions]
    i = 0
    for e_start, e_end in edges:
        while i < len(regions) and regions[i][1] <= e_start - reach_s:
            i += 1
        best, best_key = -1, (0.0, 0.0)
        k = i
        while k < len(regions) and regions[k][0] < e_end + reach_s:
            start, end = regions[k]
            overlap = min(end, e_end) - max(start, e_start)
            key = (overlap, 0.0) if overlap > 0 else (0.0, overlap)  # overlap first, then nearness
            if best < 0 or key > best_key:
                best, best_key = k, key
            k += 1
        if best >= 0:
            owner[best].append((e_start, e_end))
    out: list[tuple[float, float]] = []
    for (start, end), mine in zip(regions, owner, strict=True):
        if mine:
            start = min(max(mine[0][0], start - reach_s), start + reach_s)
            end = max(min(mine[-1][1], end + reach_s), end - reach_s)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        elif end > start:
            out.append((start, end))
    return out


def _join_spanned(regions: list[tuple[float, float]], edges: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    j = 0
    for start, end in regions:
        if out:
            while j < len(edges) and edges[j][1] <= out[-1][1]:
                j += 1
            if j < len(edges) and edges[j][0] < out[-1][1] and edges[j][1] > start:
                out[-1] = (out[-1][0], end)
                continue
        out.append((start, end))
    return out


def paint_regions(regions: list[tuple[float, float]], length: int, frame_s: float) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for start, end in regions:
        mask[max(0, round(start / frame_s)):min(length, round(end / frame_s))] = True
    return mask


class EnergyFrames:
    """The energy VAD (tasks/features/vad.py) over the whole recording's 10 ms frame energies."""

    frame_s = ENERGY_FRAME / SR

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._power: list[np.ndarray] = []

    def feed(self, block: np.ndarray) -> None:
        samples = np.concatenate((self._pending, np.asarray(block, dtype=np.float32).reshape(-1)))
        n = len(samples) // ENERGY_FRAME
        self._pending = samples[n * ENERGY_FRAME:]
        if n:
            self._power.append(frame_power(samples[: n * ENERGY_FRAME], SR, self.frame_s))

    def finish(self, params: VADParams) -> tuple[np.ndarray, float]:
        if not self._power:
            return np.zeros(0, dtype=bool), self.frame_s
        power = np.concatenate(self._power)
        mask = mask_from_power_db(10.0 * np.log10(np.maximum(power, 1e-10)))
        mask = fill_short_gaps(mask, round(params.min_silence_s / self.frame_s))
        return drop_short_runs(mask, round(params.min_speech_s / self.frame_s)), self.frame_s


def detector(engine: Engine = "auto") -> FrameDetector:
    """A fresh per-recording detector: Silero when installed (or asked for), else energy."""
    return SileroFrames() if resolve_engine(engine) == "silero" else EnergyFrames()


def hysteresis(probs: np.ndarray, params: VADParams, frame_s: float) -> np.ndarray:
    """Speech mask: on at p >= threshold, off at p < neg_threshold, kept in between; then pauses
    under min_silence_s are filled and islands under min_speech_s dropped."""
    off_level = params.neg_threshold if params.neg_threshold is not None else max(params.threshold - 0.15, 0.01)
    index = np.arange(len(probs))
    last_on = np.maximum.accumulate(np.where(probs >= params.threshold, index, -1)) if len(probs) else index
    last_off = np.maximum.accumulate(np.where(probs < off_level, index, -1)) if len(probs) else index
    mask = last_on > last_off
    mask = fill_short_gaps(mask, round(params.min_silence_s / frame_s))
    return drop_short_runs(mask, round(params.min_speech_s / frame_s))


def mask_regions(mask: np.ndarray, frame_s: float) -> list[tuple[float, float]]:
    """(start_s, end_s) of each True run of a frame mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(float(s * frame_s), float(e * frame_s)) for s, e in zip(starts, ends, strict=True)]


def speech_regions(blocks: Iterable[np.ndarray], params: VADParams = VADParams(),
                   engine: Engine = "auto") -> list[tuple[float, float]]:
    """Speech regions (seconds) of a recording given as consecutive 16 kHz mono blocks."""
    frames = detector(engine)
    for block in blocks:
        frames.feed(block)
    mask, frame_s = frames.finish(params)
    return mask_regions(mask, frame_s)


def speech_seconds(audio: np.ndarray, sr: int = SR, params: VADParams = VADParams(),
                   engine: Engine = "auto") -> float:
    """Seconds of speech in one 16 kHz clip (the speaking rate's denominator)."""
    if sr != SR:
        raise ValueError(f"speech_seconds expects {SR} Hz audio, got {sr} Hz")
    regions = speech_regions([audio], params, engine)
    duration = len(audio) / sr
    return float(sum(min(end, duration) - start for start, end in regions))
