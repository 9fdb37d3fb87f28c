"""Fidelity measures on cases whose answer is known: copies, distortions, shuffled labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge.records import AAMI_CLASSES
from trainer.dataset import BeatSet, build_beatset
from trainer.fidelity import (
    REAL_REFERENCE,
    BeatFeatures,
    coverage,
    fidelity_report,
    fidelity_table,
    frechet_distance,
    mmd2,
    nearest_distances,
    persona_consistency,
    plot_real_vs_generated,
)

DATA = Path(__file__).parent / "data"
N, V = AAMI_CLASSES.index("N"), AAMI_CLASSES.index("V")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny tensors: one thread is fastest, and CI machines are often oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def beats() -> BeatSet:
    return build_beatset(["100", "119", "208"], DATA)


@pytest.fixture(scope="module")
def report(beats: BeatSet) -> dict:
    rng = np.random.default_rng(0)
    noisy = beats.beats + rng.normal(0, 0.15, beats.beats.shape).astype(np.float32)
    shifted = np.roll(beats.beats, 12, axis=1)
    return fidelity_report(beats, beats, {
        "copy": (beats.beats, beats.labels),
        "noisy": (noisy, beats.labels),
        "shifted": (shifted, beats.labels),
        "shuffled": (beats.beats, rng.permutation(beats.labels)),
    })


def test_gaussian_distances_have_their_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    b = rng.standard_normal((4000, 3)) + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, a) < 1e-6
    assert abs(frechet_distance(a, b) - 1.0) < 0.15  # |mu_a - mu_b|^2 with equal covariances
    assert frechet_distance(a, 2.0 * a) > 2.5  # spread alone: (1 - 2)^2 per dimension
    same = mmd2(a[:500], rng.standard_normal((500, 3)), width=1.5)
    shifted = mmd2(a[:500], b[:500], width=1.5)
    assert abs(same) < 0.01 and shifted > 0.1


def test_nearest_and_coverage() -> None:
    rng = np.random.default_rng(1)
    centres = 3.0 * rng.standard_normal((10, 192)).astype(np.float32)
    real = np.repeat(centres, 30, axis=0) + 0.1 * rng.standard_normal((300, 192)).astype(np.float32)
    np.testing.assert_allclose(nearest_distances(real, real), 0.0, atol=1e-3)
    assert coverage(real, real) == 1.0
    one_mode = real[:30] + 0.01 * rng.standard_normal((30, 192)).astype(np.float32)
    assert 0.05 <= coverage(real, one_mode) <= 0.15  # a collapsed generator reaches one mode in ten
    assert coverage(real, real + 10.0) == 0.0


def test_features_are_fixed_and_standardised(beats: BeatSet) -> None:
    feats = BeatFeatures.fit(beats)
    f = feats(beats.beats)
    assert f.shape == (len(beats), len(feats.names)) and np.all(np.isfinite(f))
    again = BeatFeatures.fit(beats)
    np.testing.assert_allclose(again(beats.beats[:10]), f[:10], atol=1e-5)
    assert abs(float(np.mean(f[:, -1]))) < 1.0  # DS1-standardised, not refitted per model


def test_identical_set_scores_zero_and_tstr_equals_trtr(report: dict) -> None:
    copy = report["models"]["copy"]
    for c in ("N", "V"):
        row = copy["per_class"][c]
        assert row["frechet"] < 1e-3, row
        assert abs(row["mmd"]) < 0.03 and row["nn_test"] < 1e-3 and row["coverage"] == 1.0
        assert row["spread"] == pytest.approx(row["spread_real"])
    assert copy["tstr"] == report["trtr"] == report["models"][REAL_REFERENCE]["tstr"]
    assert report["trtr"]["macro_f1"] > 0.6  # trained and tested on the same beats


def test_distorted_sets_score_far(report: dict) -> None:
    copy = report["models"]["copy"]["per_class"]["N"]
    for name in ("noisy", "shifted"):
        row = report["models"][name]["per_class"]["N"]
        assert row["frechet"] > 1.0 and row["frechet"] > 1000 * max(copy["frechet"], 1e-6), (name, row)
        assert row["mmd"] > 0.05 and row["nn_test"] > 0.05 and row["coverage"] < 0.5
    assert report["models"]["noisy"]["per_class"]["N"]["spread"] > copy["spread"]


def test_shuffled_labels_train_a_chance_classifier(report: dict) -> None:
    shuffled = report["models"]["shuffled"]["tstr"]
    assert shuffled["macro_f1"] < report["trtr"]["macro_f1"] - 0.3
    assert shuffled["f1"]["V"] < 0.5 < report["trtr"]["f1"]["V"]
    agreement = report["models"]["shuffled"]["per_class"]["V"]["class_agreement"]
    assert agreement < 0.5  # V-labelled beats are mostly N beats, and the real classifier says so


def test_memorisation_flags_copies_of_training_beats(beats: BeatSet) -> None:
    train = beats.subset(beats.record != "100")
    test = beats.subset(beats.record == "100")
    rep = fidelity_report(test, train, {
        "copies": (train.beats, train.labels),
        "unseen": (test.beats, test.labels),
    }, include_reference=False)
    copies, unseen = rep["models"]["copies"]["per_class"]["N"], rep["models"]["unseen"]["per_class"]["N"]
    assert copies["memorisation"] < 0.05 and copies["copy_rate"] > 0.95
    assert unseen["memorisation"] == pytest.approx(1.0) and unseen["copy_rate"] < 0.1


def test_table_has_every_model_and_class(report: dict) -> None:
    table = fidelity_table(report)
    header = table.splitlines()[0]
    for name in (REAL_REFERENCE, "copy", "noisy", "shifted", "shuffled"):
        assert name in header
    for c in AAMI_CLASSES:
        assert f"| {c} " in table
    assert "TSTR macro F1" in table
    assert all(line.count("|") == header.count("|") for line in table.splitlines())


def test_persona_consistency_separates_grouped_from_random() -> None:
    rng = np.random.default_rng(0)
    offsets = rng.standard_normal((6, 192)).astype(np.float32)
    groups = np.repeat(np.arange(6), 40)
    beats = offsets[groups] + 0.2 * rng.standard_normal((240, 192)).astype(np.float32)
    labels = np.zeros(240, np.int64)
    labels[1::4] = 1  # S beats share their person's shape, as real ones share the QRS
    grouped = persona_consistency(beats, labels, groups)
    scattered = persona_consistency(beats, labels, rng.permutation(groups))
    assert grouped["N"]["ratio"] < 0.5 and 0.9 < scattered["N"]["ratio"] < 1.1
    assert grouped["cross_NS"]["ratio"] < 0.5 and scattered["cross_NS"]["ratio"] > 0.8


def test_plot_writes_a_png(beats: BeatSet, tmp_path: Path) -> None:
    path = tmp_path / "real_vs_generated.png"
    plot_real_vs_generated(beats, {"copy": (beats.beats, beats.labels)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
