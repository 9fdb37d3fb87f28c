"""Privacy attacks on beats: re-identification, linkability and membership inference.

The attacker is deliberately simple and strong on real ECG: every beat becomes a feature vector
(the canonical beat at 125 Hz, its log amplitude and its log RR context), standardised on the
enrolment beats, and a test beat goes to the subject of its nearest enrolment beat (1-NN). On
real DS2 beats (enrol on the first half of each record, test on the second) it identifies 92 % of
single beats among 22 people; over 10-beat windows it does better. A product that cuts that to a
few times chance has removed what the beat shape and amplitude carry; what RR alone carries is
the rhythm twin's share (DESIGN.md).

AUCs come from the Mann-Whitney statistic (ties count half), so no machine-learning library is
needed for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

#: Chunk of test beats per distance matrix (bounds memory: chunk x enrolment beats floats).
_CHUNK = 512


#: The last columns of :func:`beat_features`: the beat's RR context (the rest: shape and amplitude).
#: Attackers on either part alone split identity into what the rhythm carries (kept on purpose,
#: DESIGN.md) and what the beat's shape carries (what the surrogates must not).
RHYTHM_COLUMNS = 2
FEATURE_VIEWS: dict[str, slice] = {"all": slice(None), "shape": slice(0, -RHYTHM_COLUMNS),
                                   "rhythm": slice(-RHYTHM_COLUMNS, None)}


def beat_features(beats: np.ndarray, scale: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """(n, 96 + 1 + 2) features: every other canonical sample, log amplitude, log pre/local RR."""
    beats = np.asarray(beats, dtype=np.float64)
    amplitude = np.log(np.maximum(np.asarray(scale, dtype=np.float64), 1e-6))[:, None]
    rhythm = np.log(np.clip(np.asarray(rr, dtype=np.float64)[:, :2], 0.2, 3.0))
    return np.concatenate([beats[:, ::2], 2.0 * amplitude, rhythm], axis=1)


@dataclass
class NearestNeighbourAttacker:
    """1-NN re-identification over enrolled beats (see the module docstring)."""

    features: np.ndarray  # standardised enrolment features
    subjects: np.ndarray  # subject of each enrolment beat
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def enrol(cls, features: np.ndarray, subjects: np.ndarray, max_beats: int = 20_000,
              seed: int = 0) -> NearestNeighbourAttacker:
        """Enrol up to ``max_beats`` beats (a class- and subject-blind random subset)."""
        features = np.asarray(features, dtype=np.float64)
        subjects = np.asarray(subjects)
        if len(features) > max_beats:
            keep = np.random.default_rng(seed).choice(len(features), max_beats, replace=False)
            features, subjects = features[keep], subjects[keep]
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
        return cls((features - mean) / std, subjects, mean, std)

    @property
    def labels(self) -> np.ndarray:
        """The enrolled subjects, in the column order of :meth:`distances`."""
        return np.unique(self.subjects)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(n, subjects) distance from each test beat to the nearest enrolled beat of each subject."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        labels, index = np.unique(self.subjects, return_inverse=True)
        out = np.empty((len(z), len(labels)))
        norms = (self.features**2).sum(axis=1)
        for lo in range(0, len(z), _CHUNK):
            q = z[lo : lo + _CHUNK]
            d = (q**2).sum(axis=1)[:, None] + norms[None, :] - 2.0 * q @ self.features.T
            for j in range(len(labels)):
                out[lo : lo + len(q), j] = d[:, index == j].min(axis=1)
        return np.sqrt(np.maximum(out, 0.0))

    def rank1(self, features: np.ndarray, subjects: np.ndarray, window: int = 1) -> float:
        """Share of test windows (``window`` consecutive beats of one subject, summed distances)
        whose nearest subject is the right one."""
        return self.rank1_windows(features, subjects, (window,))[0]

    def rank1_windows(self, features: np.ndarray, subjects: np.ndarray, windows: tuple[int, ...]) -> list[float]:
        """:meth:`rank1` for each window length, from one distance matrix."""
        subjects = np.asarray(subjects)
        d, labels = self.distances(features), self.labels
        out = []
        for window in windows:
            hits = total = 0
            for s in np.unique(subjects):
                rows = d[subjects == s]
                for lo in range(0, len(rows) - window + 1, window):
                    hits += labels[np.argmin(rows[lo : lo + window].sum(axis=0))] == s
                    total += 1
            out.append(hits / total if total else float("nan"))
        return out


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U / (n_pos n_neg))."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2.0
    return float(u / (len(positive) * len(negative)))


def linkability_auc(sessions: list[np.ndarray], people: list[str]) -> float:
    """Can two sessions be told to be the same person? Score of a pair = minus the distance
    between the sessions' mean standardised features; AUC of same-person pairs over the rest."""
    stacked = np.concatenate(sessions)
    mean, std = stacked.mean(axis=0), stacked.std(axis=0) + 1e-6
    centres = [((s - mean) / std).mean(axis=0) for s in sessions]
    same, different = [], []
    for i in range(len(sessions)):
        for j in range(i + 1, len(sessions)):
            score = -float(np.linalg.norm(centres[i] - centres[j]))
            (same if people[i] == people[j] else different).append(score)
    return auc(np.array(same), np.array(different))


def membership_auc(members: np.ndarray, non_members: np.ndarray, generated: np.ndarray) -> float:
    """Membership inference from the generator's output: a beat scores higher the closer its
    nearest generated beat is. AUC of training beats (members) over unseen beats (non-members)."""
    return auc(-nearest_distance(members, generated), -nearest_distance(non_members, generated))


def nearest_distance(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance from each row of ``x`` to its nearest row of ``reference``."""
    ref = np.asarray(reference, dtype=np.float64)
    norms = (ref**2).sum(axis=1)
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(len(x))
    for lo in range(0, len(x), _CHUNK):
        q = x[lo : lo + _CHUNK]
        d = (q**2).sum(axis=1)[:, None] + norms[None, :] - 2.0 * q @ ref.T
        out[lo : lo + len(q)] = np.sqrt(np.maximum(d.min(axis=1), 0.0))
    return out
