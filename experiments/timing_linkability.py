"""Can any timing setting take linkability below the rhythm twin's? Two sessions of one person
(the two 5-min halves of each DS2 record's first 10 min, reference beat times) are scored by
the evaluation's linkability attack and its 1-NN attacker on RR alone (log pre-RR and log local
RR, as ``trainer.privacy.beat_features`` has them), with the beat times as recorded and under
the settings DESIGN.md names for going below the twin: R-peak jitter, RR smoothing, and a
per-session tempo change (which breaks promise 2: the R-peaks leave their instants).

usage: timing_linkability.py DATA_DIR      (docs/identity.md)"""
import sys

import numpy as np

from edge.records import DS2, read_record
from trainer.dataset import rr_features
from trainer.privacy import FEATURE_VIEWS, NearestNeighbourAttacker, beat_features, linkability_auc


def rhythm(r: np.ndarray, fs: float) -> np.ndarray:
    """The attacker's RR columns of ``beat_features`` (its shape columns need no beats here)."""
    n = len(r)
    return beat_features(np.zeros((n, 2)), np.ones(n), rr_features(r, fs))[:, FEATURE_VIEWS["rhythm"]]


def smoothed(r: np.ndarray, beats: int) -> np.ndarray:
    """Beat times whose RR intervals are their ``beats``-beat moving mean (same mean rate)."""
    rr = np.diff(r)
    pad = np.pad(rr, (beats // 2, beats - 1 - beats // 2), mode="edge")
    return np.concatenate([[r[0]], r[0] + np.cumsum(np.convolve(pad, np.ones(beats) / beats, mode="valid"))])


def main(data_dir: str) -> None:
    rng = np.random.default_rng(0)
    records = []
    for name in DS2:
        rec = read_record(name, data_dir, 0, sampto=None)
        n = round(600 * rec.fs)
        records.append((name, rec.beat_samples[rec.beat_samples < n].astype(float), rec.fs, n))
    settings = {"as recorded": lambda r, fs: r}
    for ms in (5, 20, 50):
        settings[f"R jitter ±{ms} ms"] = lambda r, fs, ms=ms: r + rng.uniform(-ms, ms, len(r)) * fs / 1000
    for beats in (8, 32):
        settings[f"RR moving mean, {beats} beats"] = lambda r, fs, beats=beats: smoothed(r, beats)
    for q in (0.05, 0.1, 0.2):
        settings[f"session tempo ±{q:.0%} (breaks promise 2)"] = \
            lambda r, fs, q=q: r[0] + (r - r[0]) * np.exp(rng.uniform(-q, q))
    print("| beat times | linkability AUC, RR alone | rank-1, RR alone, single beats | 10-beat windows |")
    print("|---|---:|---:|---:|")
    for label, transform in settings.items():
        sessions, people, enrol, enrol_who, test, test_who = [], [], [], [], [], []
        for name, r, fs, n in records:
            for part, (lo, hi) in enumerate(((0, n // 2), (n // 2, n))):
                f = rhythm(np.round(transform(r[(r >= lo) & (r < hi)], fs)).astype(int), fs)
                sessions.append(f)
                people.append(name)
                (enrol, test)[part].append(f)
                (enrol_who, test_who)[part].append(np.full(len(f), name))
        attacker = NearestNeighbourAttacker.enrol(np.concatenate(enrol), np.concatenate(enrol_who))
        single, ten = attacker.rank1_windows(np.concatenate(test), np.concatenate(test_who), (1, 10))
        print(f"| {label} | {linkability_auc(sessions, people):.3f} | {100 * single:.1f} % | {100 * ten:.1f} % |",
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
