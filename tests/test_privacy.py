"""The privacy attacks give the answers known in advance on cases built to have them, and the
re-identification attacker is strong on real beats (MIT-BIH slices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge import codec
from edge.records import read_record
from trainer.dataset import rr_features
from trainer.privacy import NearestNeighbourAttacker, auc, beat_features, linkability_auc, membership_auc

DATA = Path(__file__).parent / "data"


def _people(n_people: int = 6, beats: int = 80, noise: float = 0.3, seed: int = 0):  # noqa: ANN202
    """Each person: a fixed random 'shape' plus per-beat noise."""
    rng = np.random.default_rng(seed)
    shapes = rng.standard_normal((n_people, 20))
    x = np.concatenate([shapes[p] + noise * rng.standard_normal((beats, 20)) for p in range(n_people)])
    who = np.repeat([f"p{p}" for p in range(n_people)], beats)
    return x, who


def test_auc_known_values() -> None:
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_an_identity_stream_is_reidentified_and_a_shuffled_one_is_not() -> None:
    x, who = _people()
    first = np.tile(np.arange(80) < 40, 6)
    attacker = NearestNeighbourAttacker.enrol(x[first], who[first])
    assert attacker.rank1(x[~first], who[~first]) > 0.95
    assert attacker.rank1(x[~first], who[~first], window=10) == 1.0
    shuffled = np.random.default_rng(1).permutation(who[~first])
    # Labels that say nothing about the beats: chance (1/6) within sampling noise.
    assert attacker.rank1(x[~first], shuffled) < 0.35


def test_linkability_separates_people_and_not_strangers() -> None:
    x, who = _people(beats=60)
    sessions = [x[who == p][:30] for p in np.unique(who)] + [x[who == p][30:] for p in np.unique(who)]
    people = list(np.unique(who)) * 2
    assert linkability_auc(sessions, people) > 0.95
    rng = np.random.default_rng(3)
    random_sessions = [rng.standard_normal((30, 20)) for _ in range(12)]
    assert 0.3 < linkability_auc(random_sessions, people) < 0.7


def test_membership_of_copied_training_beats_is_detected() -> None:
    rng = np.random.default_rng(5)
    members, non_members = rng.standard_normal((300, 10)), rng.standard_normal((300, 10))
    copies = members + 0.01 * rng.standard_normal(members.shape)  # a generator that memorised
    assert membership_auc(members, non_members, copies) > 0.95
    fresh = rng.standard_normal((300, 10))  # one that did not
    assert 0.4 < membership_auc(members, non_members, fresh) < 0.6


def test_the_attacker_reidentifies_real_people() -> None:
    """Five MIT-BIH slices, enrolled on the first minute, tested on the second."""
    feats, who = [], []
    for name in ("100", "105", "119", "208", "232"):
        rec = read_record(name, DATA)
        enc = codec.encode(rec.signal, rec.beat_samples, rec.fs)
        feats.append(beat_features(enc.beats, enc.scale, rr_features(rec.beat_samples, rec.fs)))
        who.append(np.full(len(rec.beat_samples), name))
        feats[-1] = np.concatenate([feats[-1], (rec.beat_samples >= 60 * rec.fs)[:, None]], axis=1)
    x, who = np.concatenate(feats), np.concatenate(who)
    second = x[:, -1] == 1
    x = x[:, :-1]
    attacker = NearestNeighbourAttacker.enrol(x[~second], who[~second])
    assert attacker.rank1(x[second], who[second]) > 0.9


def test_evaluate_writes_a_report_on_the_committed_slices(tmp_path: Path) -> None:
    """The whole evaluation end to end, small: 'training' records 208 and 119, evaluated 100, 105, 232."""
    import json

    from trainer.classifier import ClassifierConfig
    from trainer.evaluate import evaluate

    judge = ClassifierConfig(epochs=3, samples_per_epoch=2048, min_epochs=1, val_records=("119",), fit_bias=False)
    report = evaluate(str(DATA), tmp_path, ("100", "105", "232"), minutes=2.0, cache_dir=None,
                      training_records=("208", "119"), curve=((0.0, 0.0), (1.0, 1.0)), judge_config=judge)
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["reidentification"]["raw"]["rank1_beat"] > 0.9  # the attacker is strong on real beats
    assert report["reidentification"]["product"]["rank1_beat"] < report["reidentification"]["raw"]["rank1_beat"]
    product = report["reidentification"]["product"]  # one figure per persona draw, then their mean and its error
    assert len(product["draws"]) == report["draws"] == 6 and abs(product["rank1_beat"] - np.mean(product["draws"])) < 1e-12
    assert product["rank1_beat_se"] > 0 and 0.0 <= report["linkability_auc"]["product"] <= 1.0
    assert "Product minus twin" in (tmp_path / "report.md").read_text()
    raw = report["reidentification"]["raw"]  # the rhythm is kept, the shape is not
    assert abs(product["rank1_beat_rhythm"] - raw["rank1_beat_rhythm"]) < 0.05
    assert product["rank1_beat_shape"] < raw["rank1_beat_shape"] - 0.3
    assert all(row["se"] > 99 for row in report["timing"])
    assert set(report["membership_auc"]) == {"product", "twin"}
    assert all(0.0 <= v <= 1.0 for v in report["membership_auc"].values())
    draws = report["membership_draws"]["product"]  # several attack draws, their mean and its error
    assert len(draws) == 10 and len(set(draws)) > 1 and abs(report["membership_auc"]["product"] - np.mean(draws)) < 1e-12
    links = report["linkability_views"]  # timing links the product's sessions as it links the raw ones
    assert links["product"]["all"] == report["linkability_auc"]["product"]
    assert abs(links["product"]["rhythm"] - links["raw"]["rhythm"]) < 0.1, links
    assert all(d["se"] > 95 for d in report["detection_xqrs"])  # an independent detector finds the surrogates
    assert len(report["tradeoff"]) == 2 and all(p["draws"] == 3 for p in report["tradeoff"])
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert (tmp_path / "strips.png").stat().st_size > 0
    f1 = report["class_f1"]  # the class each surrogate carries scores as the classifier does on real beats
    assert abs(f1["edge"]["N"] - f1["raw"]["N"]) < 0.05 and abs(f1["edge"]["macro"] - f1["raw"]["macro"]) < 0.1
    # the judge (a second classifier) reads real and emitted beats of the committed slices
    assert {"raw, judge", "reclassified, judge"} <= set(f1) and f1["raw, judge"]["N"] > 0.5
    assert "with the judge" in (tmp_path / "report.md").read_text()


def test_evaluate_with_redraw_reads_the_product_with_a_feature_judge(tmp_path: Path) -> None:
    """The product stream under classifier-guided redraw, read by the feature-based judge (no
    second CNN trained); the report says that the shipped classifier's reading is not independent."""
    from trainer.evaluate import evaluate

    from trainer.tasks import IMAGE_BASELINE_WEIGHTS

    report = evaluate(str(DATA), tmp_path, ("100", "232"), minutes=2.0, cache_dir=None, training_records=("208", "119"),
                      curve=(), detect_with_xqrs=False, draws=1, product_settings={"redraw": 4}, recipe_judge=False,
                      feature_judge=True, baseline_run=IMAGE_BASELINE_WEIGHTS)
    assert report["streams"] == ["raw", "product", "twin", "image baseline"]  # the shipped baseline's rows
    assert 0.0 <= report["membership_auc"]["image baseline"] <= 1.0
    f1 = report["class_f1"]
    assert {"raw, features judge", "reclassified, features judge"} <= set(f1) and "raw, judge" not in f1
    assert f1["raw, features judge"]["N"] > 0.5  # two training records make a weak judge; it still reads
    assert 0.0 <= f1["reclassified, features judge"]["macro"] <= 1.0
    assert report["product_settings"] == {"redraw": 4}
    assert 0.0 <= report["membership_auc"]["product"] <= 1.0
    text = (tmp_path / "report.md").read_text()
    assert "with the features judge" in text and "not an independent reading" in text


def test_hrv_and_f1_helpers_give_known_answers() -> None:
    from trainer.evaluate import _f1, _hrv

    steady = _hrv(np.arange(0, 60 * 360, 360), 360.0)  # one beat a second
    assert steady["hr_bpm"] == 60.0 and steady["sdnn_ms"] == 0.0 and steady["rmssd_ms"] == 0.0
    alternating = np.concatenate([[0], np.cumsum(np.tile([288, 432], 20))])  # RR 0.8, 1.2, 0.8 s ... at 360 Hz
    h = _hrv(alternating, 360.0)
    assert abs(h["hr_bpm"] - 60.0) < 1e-9 and abs(h["rmssd_ms"] - 400.0) < 1e-6
    assert abs(h["sdnn_ms"] - 1000 * np.std(np.diff(alternating) / 360.0, ddof=1)) < 1e-9
    f1 = _f1(["N", "N", "V", "V"], ["N", "V", "V", "V"])
    assert f1["N"] == 2 / 3 and f1["V"] == 0.8 and f1["macro"] == (2 / 3 + 0.8) / 2


def test_xqrs_on_the_original_signal_finds_its_beats() -> None:
    from trainer.evaluate import _xqrs_score

    rec = read_record("100", DATA)
    score = _xqrs_score(rec.signal, rec.beat_samples, rec.fs)
    assert score["se"] > 98 and score["ppv"] > 98
    flat = _xqrs_score(np.zeros_like(rec.signal), rec.beat_samples, rec.fs)  # nothing to find
    assert not flat["se"] > 5
