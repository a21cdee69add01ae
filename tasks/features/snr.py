"""Blind signal-to-noise ratio with WADA-SNR (Kim & Stern, Interspeech 2008).

Why WADA: it needs no VAD and no noise-only stretch. It assumes clean speech amplitudes follow a
Gamma distribution with shape 0.4 and the noise is Gaussian; the statistic
G = ln E|z| - E ln|z| of the noisy signal z then grows monotonically with the SNR, so the
measured G is looked up in a G-versus-SNR table. The table is not copied from the original
MATLAB release (a Monte-Carlo curve): `wada_table` integrates the same model numerically,
once per process (~30 ms). Estimates are clamped to the table's -20 .. 100 dB range; clips
with digital silence read high, as they should.

Why the whole clip and not only its speech regions (dataspeech's choice): cut to the energy-VAD
speech regions, real speech is less sparse than the Gamma(0.4) model (its pauses are gone), G
drops, and real clips with known added noise read 3-14 dB low at 20-30 dB where the whole clip
is within 2 dB; docs/decisions.md (issue 14 part 6) has the figures.
`wada_snr_over_speech` is kept to measure that again, not used by the pipeline.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from tasks.features.vad import FRAME_S, speech_mask

SPEECH_GAMMA_SHAPE = 0.4
SNR_MIN_DB, SNR_MAX_DB = -20.0, 100.0
EPS = 1e-10  # amplitudes below EPS * peak are clipped, as in the reference implementation
_GRID_STEP = 0.01  # log-domain integration step; halving it moves the table by < 1e-3
MIN_SPEECH_FOR_WADA_S = 0.5  # fewer speech seconds (8000 samples at 16 kHz) than this: G too noisy, use the clip


def _mean_log_abs_shifted_normal(ln_mu: np.ndarray) -> np.ndarray:
    """E ln|mu + Z| for Z ~ N(0, 1), evaluated on a grid of ln(mu)."""
    from scipy.special import digamma, gammaln  # here: scipy costs ~0.6 s to import; a CLI start needs none

    mu = np.exp(ln_mu)
    out = np.empty_like(mu)
    large = mu > 20.0
    m = mu[large]
    out[large] = np.log(m) - 0.5 / m**2 - 0.75 / m**4 - 2.5 / m**6  # Taylor series of ln(1 + Z/mu)
    # (mu + Z)^2 is non-central chi-square(1, mu^2): a Poisson(mu^2/2) mixture of chi-square(1+2k),
    # and E ln chi-square(nu) = ln 2 + digamma(nu/2).
    half_lambda = (mu[~large] ** 2 / 2.0)[:, None]
    k = np.arange(400)[None, :]
    poisson = np.exp(-half_lambda + k * np.log(np.maximum(half_lambda, 1e-300)) - gammaln(k + 1))
    out[~large] = 0.5 * (np.log(2.0) + (poisson * digamma(k + 0.5)).sum(axis=1))
    return out


@cache
def wada_table(alpha: float = SPEECH_GAMMA_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(snr_db, G) for a Gamma(alpha) speech amplitude plus Gaussian noise, 1 dB steps."""
    from scipy.special import erf, gammaln

    snr_db = np.arange(SNR_MIN_DB, SNR_MAX_DB + 1.0)
    ln_mu = np.arange(-20.0, 25.0, _GRID_STEP)
    phi = _mean_log_abs_shifted_normal(ln_mu)
    u = np.arange(-80.0, np.log(80.0), _GRID_STEP)  # u = ln g, g ~ Gamma(alpha, 1)
    g = np.exp(u)
    weight = np.exp(alpha * u - g - gammaln(alpha)) * _GRID_STEP
    signal_power = alpha * (alpha + 1.0)  # E g^2
    table = np.empty_like(snr_db)
    for i, snr in enumerate(snr_db):
        sigma = np.sqrt(signal_power / 10.0 ** (snr / 10.0))
        mu = g / sigma
        folded_mean = np.sqrt(2.0 / np.pi) * np.exp(-(mu**2) / 2.0) + mu * erf(mu / np.sqrt(2.0))  # E|mu+Z|
        # G is scale-free: ln E|z| - E ln|z| with z/sigma = g/sigma + Z.
        table[i] = np.log(weight @ folded_mean) - weight @ np.interp(np.log(mu), ln_mu, phi)
    return snr_db, table


def wada_snr(audio: np.ndarray) -> float:
    """WADA-SNR estimate of a clip in dB, within [-20, 100]."""
    magnitude = np.abs(audio)
    peak = float(magnitude.max())
    if peak <= 0.0:
        return SNR_MIN_DB
    np.maximum(magnitude, np.float32(EPS * peak), out=magnitude)
    g_stat = float(np.log(magnitude.mean(dtype=np.float64))) - float(np.log(magnitude).mean(dtype=np.float64))
    snr_db, table = wada_table()
    return float(np.interp(g_stat, table, snr_db))


def speech_samples(audio: np.ndarray, sr: int) -> np.ndarray:
    """The clip's samples inside the energy VAD's speech frames (tasks/features/vad.py), concatenated."""
    hop = max(1, round(FRAME_S * sr))
    keep = np.repeat(speech_mask(audio, sr), hop)
    return np.asarray(audio)[: len(keep)][keep]


def wada_snr_over_speech(audio: np.ndarray, sr: int) -> float:
    """WADA-SNR over the speech regions only (whole clip below MIN_SPEECH_FOR_WADA_S); see the module doc."""
    speech = speech_samples(audio, sr)
    return wada_snr(speech if len(speech) >= MIN_SPEECH_FOR_WADA_S * sr else audio)
