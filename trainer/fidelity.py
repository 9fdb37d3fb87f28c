"""Fidelity of surrogate beats: how close generated beats are to real ones, class by class.

The reference is always *real DS2 beats*: subjects the generators never saw. Every model is
scored the same way, and so is a reference entry made of real DS1 beats (``REAL_REFERENCE``),
which is what a generator that reproduced DS1 exactly would score against DS2: inter-patient
variation sets that level, and the table shows it beside the models.

Features. Distribution distances need a feature space that is fixed once and shared by every
model, or the numbers of two models are not comparable. ``BeatFeatures`` is fitted once on real
DS1 beats (class-balanced, so the few S, F and Q shapes shape the basis too) and is then frozen:

* the first ``PCA_COMPONENTS`` principal components of the canonical beat (they hold most of the
  beat energy: QRS polarity and width, T-wave polarity and size, baseline slope);
* hand-crafted ECG measurements on the canonical grid: R sample value, QRS extremes, QRS width
  (samples above 30% of the R amplitude between -96 and +160 ms), P-wave peak-to-peak before the
  QRS, T-wave maximum, minimum and position, and the beat's RMS;
* each feature standardised by its DS1 mean and spread.

Measures, per class (``n`` beats of each side, subsampled to ``max_per_class``):

* ``frechet``: Fréchet distance between Gaussian fits of the two feature clouds (the FID formula
  on these features); ``mmd``: squared maximum mean discrepancy with a Gaussian kernel whose
  width is the median DS1 feature distance (fixed at fit time). Both ~0 for the same
  distribution, both grow with any shift in mean, spread or shape.
* ``nn_test``: median RMS distance (canonical units, R = 1) from each generated beat to its
  nearest real DS2 beat of the class: are surrogates where real beats are? ``coverage``
  (Naeem et al. 2020, k = 5): share of real DS2 beats that have a generated beat within their
  k-th-neighbour radius: are real beats' regions all reached, or only a few modes?
* ``spread`` vs ``spread_real``: mean pairwise RMS distance within the class, generated vs DS2:
  the plainest mode-collapse check.
* ``memorisation``: median distance from each generated beat to its nearest *training* (DS1)
  beat, divided by the same median for real DS2 beats. Near 1: surrogates are no closer to
  training beats than unseen people's beats are; near 0: the generator copies. ``copy_rate``:
  share of generated beats closer to a training beat than 95% of DS2 beats are (5% for unseen
  people). DS1 and DS2 are different populations, so a faithful generator of DS1 sits below 1;
  the reference entry shows how far: each DS1 beat against the *other* DS1 subjects' beats (a new
  person drawn from the training population).
* ``class_agreement``: share of generated beats that a classifier trained on real DS1 assigns
  to their own class (for the DS1 reference: that classifier's recall on DS2).

TSTR / TRTR. The same small classifier (an MLP on the fixed features, weighted 1/sqrt(class count),
fixed seed and schedule) is trained on real DS1 (TRTR) or on a model's surrogates (TSTR) and tested on real
DS2: accuracy, macro F1 and per-class F1. Shape features only: RR intervals are an input of the
generators, not something they produce, so they would measure nothing about the surrogates.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge.codec import DEFAULT_SPEC
from edge.records import AAMI_CLASSES
from trainer.dataset import BeatSet

log = logging.getLogger(__name__)

#: Principal components of the fixed feature transform.
PCA_COMPONENTS = 12
#: Name of the reference entry (real DS1 beats scored like a model).
REAL_REFERENCE = "real DS1 (reference)"
#: Beats per class and side that the distribution measures use at most.
MAX_PER_CLASS = 1000
#: Neighbours for the coverage radius.
COVERAGE_K = 5
HANDCRAFTED = ("r_value", "qrs_max", "qrs_min", "qrs_width", "p_p2p", "t_max", "t_min", "t_pos", "rms")


def handcrafted_features(beats: np.ndarray) -> np.ndarray:
    """(n, 9) ECG measurements on canonical beats (R at index ``pre``, 250 Hz)."""
    x = np.asarray(beats, dtype=np.float32)
    r = DEFAULT_SPEC.pre
    ms = DEFAULT_SPEC.fs / 1000.0
    qrs = x[:, r - int(48 * ms) : r + int(48 * ms) + 1]
    wide = x[:, r - int(96 * ms) : r + int(160 * ms)]
    width = (np.abs(wide) > 0.3 * np.abs(x[:, r : r + 1]).clip(0.2)).sum(1) / ms
    p = x[:, int(16 * ms) : r - int(60 * ms)]
    t = x[:, r + int(100 * ms) : r + int(440 * ms)]
    t_pos = np.argmax(np.abs(t), axis=1) / ms
    return np.stack([
        x[:, r], qrs.max(1), qrs.min(1), width, p.max(1) - p.min(1), t.max(1), t.min(1), t_pos,
        np.sqrt((x ** 2).mean(1)),
    ], axis=1).astype(np.float32)


@dataclass
class BeatFeatures:
    """The frozen feature transform: PCA of canonical beats plus ECG measurements, standardised."""

    mean_beat: np.ndarray  # (L,)
    components: np.ndarray  # (PCA_COMPONENTS, L)
    feature_mean: np.ndarray  # (d,)
    feature_std: np.ndarray  # (d,)
    kernel_width: float  # median feature distance on the fit set (MMD bandwidth)

    @classmethod
    def fit(cls, train: BeatSet, per_class: int = 3000, seed: int = 0) -> BeatFeatures:
        rng = np.random.default_rng(seed)
        idx = np.concatenate([
            rng.choice(np.flatnonzero(train.labels == c), min(per_class, int(np.sum(train.labels == c))), replace=False)
            for c in range(len(AAMI_CLASSES)) if np.any(train.labels == c)
        ])
        x = train.beats[idx].astype(np.float64)
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:PCA_COMPONENTS]
        raw = np.concatenate([(x - mean) @ comps.T, handcrafted_features(x)], axis=1)
        f_mean, f_std = raw.mean(0), raw.std(0) + 1e-6
        z = (raw - f_mean) / f_std
        sub = z[rng.choice(len(z), min(2000, len(z)), replace=False)]
        width = float(np.median(_pairwise(sub, sub)[np.triu_indices(len(sub), 1)]))
        return cls(mean.astype(np.float32), comps.astype(np.float32), f_mean.astype(np.float32),
                   f_std.astype(np.float32), width)

    def __call__(self, beats: np.ndarray) -> np.ndarray:
        x = np.asarray(beats, dtype=np.float32)
        raw = np.concatenate([(x - self.mean_beat) @ self.components.T, handcrafted_features(x)], axis=1)
        return ((raw - self.feature_mean) / self.feature_std).astype(np.float32)

    @property
    def names(self) -> list[str]:
        return [f"pc{i + 1}" for i in range(len(self.components))] + list(HANDCRAFTED)


# ---------------------------------------------------------------------------------------------
# distances

def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.cdist(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two (n, d) feature sets.

    ``|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2)``, the trace term from the
    eigenvalues of a symmetric matrix (no general matrix square root, no complex round-off).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    value = float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    return max(value, 0.0)


def mmd2(a: np.ndarray, b: np.ndarray, width: float) -> float:
    """Unbiased squared MMD with a Gaussian kernel of the given width."""
    gamma = 1.0 / (2.0 * width ** 2)
    kaa, kbb, kab = (np.exp(-gamma * _pairwise(x, y) ** 2) for x, y in ((a, a), (b, b), (a, b)))
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return float("nan")
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2.0 * kab.mean())


def nearest_distances(queries: np.ndarray, reference: np.ndarray, chunk: int = 256) -> np.ndarray:
    """RMS distance (canonical units) from each query beat to its nearest reference beat."""
    ref = torch.from_numpy(np.asarray(reference, np.float64))
    out = np.empty(len(queries), dtype=np.float64)
    for i in range(0, len(queries), chunk):
        q = torch.from_numpy(np.asarray(queries[i : i + chunk], np.float64))
        out[i : i + chunk] = torch.cdist(q, ref).min(1).values.numpy()
    return out / math.sqrt(np.asarray(queries).shape[1])


def coverage(real: np.ndarray, fake: np.ndarray, k: int = COVERAGE_K) -> float:
    """Share of real points with a fake point inside their k-th-nearest-real-neighbour ball."""
    if len(real) <= k or len(fake) == 0:
        return float("nan")
    rr = _pairwise(real, real)
    radius = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
    return float(np.mean(_pairwise(real, fake).min(1) < radius))


def mean_pairwise_rms(beats: np.ndarray) -> float:
    """Mean RMS distance over all pairs of beats."""
    x = np.asarray(beats, np.float32)
    if len(x) < 2:
        return float("nan")
    d = _pairwise(x, x) / math.sqrt(x.shape[1])
    return float(d.sum() / (len(x) * (len(x) - 1)))


def _rms(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.sqrt(np.mean((u - v) ** 2)))


def persona_consistency(beats: np.ndarray, labels: np.ndarray, groups: np.ndarray, min_beats: int = 10,
                        per_group: int = 60, seed: int = 0) -> dict[str, Any]:
    """Does one person (real: a record; surrogates: a persona) look like one person?

    Per class: ``within`` is the mean pairwise RMS distance between beats of one group, averaged
    over groups; ``between`` the mean distance between beats of different groups; ``ratio`` =
    within / between (real people: well below 1; a generator that ignores its persona: ~1; one
    whose beats ignore z: ~0). Across classes, ``cross_<a><b>`` compares a group's mean beat of
    class a with its own mean beat of class b, against other groups' (same / other, below 1 when
    the classes of one person belong together, as a person's N and S beats share their QRS).
    """
    rng = np.random.default_rng(seed)
    beats = np.asarray(beats, np.float32)
    labels, groups = np.asarray(labels), np.asarray(groups)
    out: dict[str, Any] = {}
    for c, cname in enumerate(AAMI_CLASSES):
        members = []
        for g in np.unique(groups):
            idx = np.flatnonzero((groups == g) & (labels == c))
            if len(idx) >= min_beats:
                members.append(beats[rng.choice(idx, min(per_group, len(idx)), replace=False)])
        if len(members) < 2:
            out[cname] = {"groups": len(members)}
            continue
        within = float(np.mean([mean_pairwise_rms(m) for m in members]))
        cross = [(_pairwise(a, b) / math.sqrt(beats.shape[1])).mean()
                 for i, a in enumerate(members) for b in members[i + 1 :]]
        between = float(np.mean(cross))
        out[cname] = {"groups": len(members), "within": within, "between": between, "ratio": within / between}
    for a, b in ((0, 1), (0, 2)):
        means_a, means_b = {}, {}
        for g in np.unique(groups):
            ia = np.flatnonzero((groups == g) & (labels == a))
            ib = np.flatnonzero((groups == g) & (labels == b))
            if len(ia) >= min_beats and len(ib) >= min_beats:
                means_a[g], means_b[g] = beats[ia].mean(0), beats[ib].mean(0)
        keys = list(means_a)
        if len(keys) < 2:
            continue
        same = np.mean([_rms(means_a[g], means_b[g]) for g in keys])
        other = np.mean([_rms(means_a[g], means_b[h]) for g in keys for h in keys if g != h])
        out[f"cross_{AAMI_CLASSES[a]}{AAMI_CLASSES[b]}"] = {"groups": len(keys), "same": float(same),
                                                          "other": float(other), "ratio": float(same / other)}
    return out


# ---------------------------------------------------------------------------------------------
# train-on-X, test-on-real

class _MLP(torch.nn.Module):
    def __init__(self, d: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(AAMI_CLASSES))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(features: np.ndarray, labels: np.ndarray, seed: int = 0, steps: int = 200) -> _MLP:
    """The fixed TSTR/TRTR classifier: a one-hidden-layer MLP, full-batch Adam, fixed seed.

    Class weights go as 1/sqrt(count) (fully balanced weights let 8 Q and 414 F beats of one
    record pull half the N beats of other people into those classes).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    counts = torch.bincount(y, minlength=len(AAMI_CLASSES)).double()
    weight = torch.where(counts > 0, (counts.sum() / counts.clamp_min(1)).sqrt(), torch.zeros((), dtype=torch.float64))
    weight = (weight * counts.sum() / (weight * counts).sum()).float()
    model = _MLP(x.shape[1])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) if p.ndim > 1 else torch.zeros_like(p))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval()


def predict(model: _MLP, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(features, np.float32))).argmax(1).numpy()


def classification_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro F1 over the classes present in ``truth``, and per-class F1 (None: undefined)."""
    f1: dict[str, float | None] = {}
    for c, name in enumerate(AAMI_CLASSES):
        tp = int(np.sum((pred == c) & (truth == c)))
        fp = int(np.sum((pred == c) & (truth != c)))
        fn = int(np.sum((pred != c) & (truth == c)))
        f1[name] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None  # class never seen nor predicted
    present = [AAMI_CLASSES[c] for c in np.unique(truth)]
    return {"accuracy": float(np.mean(truth == pred)), "macro_f1": float(np.mean([f1[c] for c in present])), "f1": f1}


# ---------------------------------------------------------------------------------------------
# the report

def fidelity_report(
    real_test: BeatSet,
    real_train: BeatSet,
    generated: dict[str, tuple[np.ndarray, np.ndarray]],
    max_per_class: int = MAX_PER_CLASS,
    seed: int = 0,
    include_reference: bool = True,
) -> dict[str, Any]:
    """Per-class fidelity of each model's (beats, labels) against ``real_test`` (DS2).

    ``real_train`` (DS1) fits the feature transform, is the memorisation reference and trains
    the TRTR classifier; with ``include_reference`` it is also scored as ``REAL_REFERENCE``.
    """
    rng = np.random.default_rng(seed)
    feats = BeatFeatures.fit(real_train, seed=seed)
    test_f = feats(real_test.beats)
    train_f = feats(real_train.beats)
    trtr = train_classifier(train_f, real_train.labels, seed=seed)
    test_pred = predict(trtr, test_f)
    trtr_scores = classification_scores(real_test.labels, test_pred)

    # DS2 beats' distance to their nearest training beat: the yardstick for memorisation
    held_out_nn: dict[int, np.ndarray] = {}
    test_pick: dict[int, np.ndarray] = {}
    for c in range(len(AAMI_CLASSES)):
        idx = np.flatnonzero(real_test.labels == c)
        test_pick[c] = rng.choice(idx, min(max_per_class, len(idx)), replace=False) if len(idx) else idx
        tr = real_train.beats[real_train.labels == c]
        held_out_nn[c] = nearest_distances(real_test.beats[test_pick[c]], tr) if len(tr) and len(idx) else np.empty(0)

    entries = dict(generated)
    if include_reference:
        entries = {REAL_REFERENCE: (real_train.beats, real_train.labels), **entries}
    models: dict[str, Any] = {}
    for name, (beats, labels) in entries.items():
        beats = np.asarray(beats, np.float32)
        labels = np.asarray(labels, np.int64)
        if beats.ndim != 2 or beats.shape[1] != DEFAULT_SPEC.length or len(beats) != len(labels):
            raise ValueError(f"{name}: beats must be (n, {DEFAULT_SPEC.length}) with one label each")
        is_ref = name == REAL_REFERENCE
        f_all = feats(beats)
        agree = predict(trtr, f_all)
        per_class: dict[str, Any] = {}
        for c, cname in enumerate(AAMI_CLASSES):
            own = np.flatnonzero(labels == c)
            t_idx = test_pick[c]
            row: dict[str, Any] = {"n": len(own), "n_test": int(np.sum(real_test.labels == c))}
            if len(own) == 0 or len(t_idx) == 0:
                per_class[cname] = row
                continue
            pick = rng.choice(own, min(max_per_class, len(own)), replace=False)
            gf, tf = f_all[pick], test_f[t_idx]
            row["frechet"] = frechet_distance(gf, tf) if min(len(gf), len(tf)) > 2 else float("nan")
            row["mmd"] = mmd2(gf, tf, feats.kernel_width)
            row["nn_test"] = float(np.median(nearest_distances(beats[pick], real_test.beats[t_idx])))
            row["coverage"] = coverage(tf, gf)
            row["spread"] = mean_pairwise_rms(beats[pick])
            row["spread_real"] = mean_pairwise_rms(real_test.beats[t_idx])
            # the reference's "agreement" is the real classifier's recall on DS2 beats of the class
            row["class_agreement"] = float(np.mean((test_pred if is_ref else agree[own])[
                real_test.labels == c if is_ref else slice(None)] == c))
            if len(held_out_nn[c]):
                if is_ref:  # a training beat against the other training subjects: a new person from DS1
                    to_train = _leave_subject_out(real_train, c, pick)
                else:
                    to_train = nearest_distances(beats[pick], real_train.beats[real_train.labels == c])
                if len(to_train):
                    row["memorisation"] = float(np.median(to_train) / max(np.median(held_out_nn[c]), 1e-12))
                    row["copy_rate"] = float(np.mean(to_train < np.percentile(held_out_nn[c], 5)))
            per_class[cname] = row
        if is_ref:
            tstr = trtr_scores
        else:
            model = train_classifier(f_all, labels, seed=seed)
            tstr = classification_scores(real_test.labels, predict(model, test_f))
        models[name] = {"per_class": per_class, "tstr": tstr}
        log.info("fidelity %s: TSTR macro F1 %.3f", name, tstr["macro_f1"])
    return {
        "reference": {"test": sorted(set(real_test.records)) or None, "train": sorted(set(real_train.records)) or None,
                      "features": feats.names, "max_per_class": max_per_class},
        "trtr": trtr_scores,
        "models": models,
    }


def _leave_subject_out(train: BeatSet, c: int, pick: np.ndarray) -> np.ndarray:
    """Distance from each picked training beat to the nearest class-c beat of another subject."""
    out = []
    for record in np.unique(train.record[pick]):
        mine = pick[train.record[pick] == record]
        others = train.beats[(train.labels == c) & (train.record != record)]
        if len(others):
            out.append(nearest_distances(train.beats[mine], others))
    return np.concatenate(out) if out else np.empty(0)


_ROWS: tuple[tuple[str, str, str], ...] = (
    ("frechet", "Fréchet distance ↓", "{:.2f}"),
    ("mmd", "MMD² ↓", "{:.3f}"),
    ("nn_test", "NN distance to DS2 ↓", "{:.3f}"),
    ("coverage", "coverage of DS2 ↑", "{:.2f}"),
    ("spread", "spread (DS2: {spread_real:.3f})", "{:.3f}"),
    ("class_agreement", "class agreement ↑", "{:.2f}"),
    ("memorisation", "memorisation ratio (DS2 = 1, copies → 0)", "{:.2f}"),
    ("copy_rate", "copy rate (DS2: 5%)", "{:.1%}"),
)


def fidelity_table(report: dict[str, Any]) -> str:
    """Markdown: one block of rows per class, one column per model, then TSTR rows."""
    names = list(report["models"])
    lines = ["| class | measure | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]

    def cell(value: Any, fmt: str) -> str:
        return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt.format(value)

    for cname in AAMI_CLASSES:
        rows = [report["models"][m]["per_class"].get(cname, {}) for m in names]
        n_test = next((r.get("n_test") for r in rows if "n_test" in r), 0)
        for key, label, fmt in _ROWS:
            if not any(key in r for r in rows):
                continue
            real_spread = next((r["spread_real"] for r in rows if "spread_real" in r), float("nan"))
            label = label.format(spread_real=real_spread)
            cells = " | ".join(cell(r.get(key), fmt) for r in rows)
            lines.append(f"| {cname} (DS2 n={n_test}) | {label} | {cells} |")
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        lines.append(f"| all | TSTR {label} (TRTR = reference) | "
                     + " | ".join(cell(report["models"][m]["tstr"][key], "{:.3f}") for m in names) + " |")
    for cname in AAMI_CLASSES:
        cells = " | ".join(cell(report["models"][m]["tstr"]["f1"][cname], "{:.3f}") for m in names)
        lines.append(f"| {cname} | TSTR F1 | {cells} |")
    return "\n".join(lines)


def plot_real_vs_generated(real: BeatSet, generated: dict[str, tuple[np.ndarray, np.ndarray]],
                           path: str | os.PathLike[str], per_panel: int = 6, seed: int = 0) -> None:
    """PNG grid: one row per class, real beats in the first column, each model in the next ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    columns = [("real (DS2)", real.beats, real.labels),
               *((name, np.asarray(b), np.asarray(lab)) for name, (b, lab) in generated.items())]
    t = (np.arange(DEFAULT_SPEC.length) - DEFAULT_SPEC.pre) / DEFAULT_SPEC.fs * 1000
    fig, axes = plt.subplots(len(AAMI_CLASSES), len(columns), figsize=(3.2 * len(columns), 2.0 * len(AAMI_CLASSES)),
                             sharex=True, squeeze=False)
    for i, cname in enumerate(AAMI_CLASSES):
        for j, (title, beats, labels) in enumerate(columns):
            ax = axes[i, j]
            idx = np.flatnonzero(labels == i)
            for k in rng.choice(idx, min(per_panel, len(idx)), replace=False) if len(idx) else []:
                ax.plot(t, beats[k], lw=0.8, alpha=0.8)
            ax.axvline(0, color="0.8", lw=0.5, zorder=0)
            ax.set_ylim(-2.0, 2.0)
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{cname}", fontsize=11, rotation=0, labelpad=12)
            if i == len(AAMI_CLASSES) - 1:
                ax.set_xlabel("ms from R", fontsize=8)
            ax.tick_params(labelsize=7)
            if not len(idx):
                ax.text(0.5, 0.5, "no beats", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "REAL_REFERENCE",
    "BeatFeatures",
    "classification_scores",
    "coverage",
    "fidelity_report",
    "fidelity_table",
    "frechet_distance",
    "handcrafted_features",
    "mean_pairwise_rms",
    "mmd2",
    "nearest_distances",
    "persona_consistency",
    "plot_real_vs_generated",
    "train_classifier",
]
