"""Personas and pseudonyms: who a session looks like, and what it is called.

A persona is everything about a session's output that is not clinical content: the generator's
persona latent (beat shape), the R amplitude, the baseline wander and the noise floor. All of it
is drawn from a random generator when the session starts and none of it from the wearer: scaling
surrogates to the wearer's own amplitude measurably re-identifies people (DESIGN.md, promise 4).

Pseudonyms name sessions on the wire. By default each session gets a fresh random one, so two
sessions of one wearer cannot be joined by name. Deployments that must follow a wearer over time
can opt into a keyed pseudonym: HMAC-SHA256 of the device key under a site secret, stable across
sessions and not reversible without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import numpy as np

#: Ranges personas are drawn from. R amplitudes of lead-II-like ECG span about 0.5-2.5 mV;
#: respiration moves the baseline at 0.15-0.4 Hz by a few tens of microvolts; a good chest strap's
#: noise floor is a few microvolts.
AMPLITUDE_MV = (0.6, 2.0)
WANDER_MV = (0.01, 0.05)
WANDER_HZ = (0.15, 0.4)
NOISE_MV = (0.002, 0.008)


@dataclass(frozen=True)
class Persona:
    """One fictitious person: the generator's persona latent plus the non-beat signal."""

    latent: np.ndarray  # float32 (persona_dim,), standard normal
    amplitude_mv: float  # decoded surrogates are scaled to this R amplitude
    wander_mv: float  # baseline wander amplitude
    wander_hz: float
    wander_phase: float
    noise_mv: float  # white noise standard deviation

    @classmethod
    def draw(cls, rng: np.random.Generator, persona_dim: int, spread: float = 1.0) -> Persona:
        """A new persona. ``spread`` scales the latent (0 gives every session the same shape)."""
        return cls(
            latent=(spread * rng.standard_normal(persona_dim)).astype(np.float32),
            amplitude_mv=float(np.exp(rng.uniform(*np.log(AMPLITUDE_MV)))),
            wander_mv=float(rng.uniform(*WANDER_MV)),
            wander_hz=float(rng.uniform(*WANDER_HZ)),
            wander_phase=float(rng.uniform(0.0, 2.0 * np.pi)),
            noise_mv=float(rng.uniform(*NOISE_MV)),
        )

    def baseline(self, start: int, n: int, fs: float, rng: np.random.Generator) -> np.ndarray:
        """Synthetic baseline for output samples ``start .. start+n-1``: wander plus noise."""
        t = np.arange(start, start + n) / fs
        wander = self.wander_mv * np.sin(2.0 * np.pi * self.wander_hz * t + self.wander_phase)
        return wander + self.noise_mv * rng.standard_normal(n)


class BaselineTrack:
    """A stream's synthetic baseline, read in order: ``Persona.baseline`` computed a block ahead.

    A stream emits a few dozen samples at a time; computing the wander and drawing the noise per
    emit cost more in numpy call overhead than in arithmetic. The block holds the same values the
    per-emit calls would give (the noise is the same draws in the same order from ``rng``, which
    nothing else reads). Six seconds a block: at 360 Hz a 2 s block cost 22 µs per second of
    output, a 6 s one 15 µs (8 KiB per second held)."""

    def __init__(self, persona: Persona, fs: float, rng: np.random.Generator, block_s: float = 6.0) -> None:
        self.persona, self.fs, self.rng = persona, fs, rng
        self._block = max(1, round(block_s * fs))
        self._start = 0  # output sample of _values[0]
        self._values = np.empty(0)
        self._next = 0  # output sample the next call starts at

    def take(self, start: int, n: int) -> np.ndarray:
        """Baseline of output samples ``start .. start+n-1``, where the previous call ended."""
        if start != self._next:
            raise ValueError(f"baseline read out of order: sample {start}, expected {self._next}")
        lo = start - self._start
        if lo + n > self._values.size:
            rest = self._values[lo:]
            more = self.persona.baseline(self._start + self._values.size, max(self._block, n - rest.size),
                                         self.fs, self.rng)
            self._start, self._values, lo = start, np.concatenate([rest, more]), 0
        self._next = start + n
        return self._values[lo : lo + n]

    @property
    def nbytes(self) -> int:
        return int(self._values.nbytes)


def random_pseudonym() -> str:
    """A fresh, unlinkable session name (96 random bits)."""
    return secrets.token_hex(12)


def keyed_pseudonym(device: str, secret: bytes) -> str:
    """A stable name for one device under a site secret (HMAC-SHA256, first 96 bits)."""
    if len(secret) < 16:
        raise ValueError("the pseudonym secret must be at least 16 bytes")
    return hmac.new(secret, device.encode(), hashlib.sha256).hexdigest()[:24]
