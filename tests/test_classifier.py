"""AAMI beat classifier: learns V from N across patients, scores like EC57 tables, resumes, exports.

Training here runs on the committed two-minute slices (tests/data), small enough for seconds on a
CPU; the DS1 -> DS2 figures come from ``trainer.classifier.main_experiment`` (docs/classifier.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the torch.export-based ONNX exporter needs it

from edge.records import AAMI_CLASSES
from trainer.classifier import (
    PUBLISHED,
    BeatClassifier,
    ClassifierConfig,
    classification_table,
    confusion_matrix,
    evaluate_classifier,
    export_onnx,
    fit_classifier,
    load_classifier,
    metrics_from_confusion,
    onnx_session,
    predict_proba,
    split_validation,
)
from trainer.dataset import BeatSet, build_beatset
from trainer.runs import Run

DATA = Path(__file__).parent / "data"
N, S, V, F, Q = range(5)

#: A model small and short enough to train in a few seconds on the slices.
TINY = ClassifierConfig(
    epochs=12, samples_per_epoch=2048, batch_size=64, lr=1e-2, channels=(4, 8, 8, 8), hidden=16,
    min_epochs=3, patience=3, val_records=("105",), seed=0, restarts=1,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine lose a lot to contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_set() -> BeatSet:
    # V beats come from 208 only; 105 (noisy, five PVCs) is the validation fold.
    return build_beatset(["100", "105", "208", "232"], data_dir=DATA)


@pytest.fixture(scope="module")
def held_out() -> BeatSet:
    # 119: another patient's PVCs (bigeminy), never seen in training or selection.
    return build_beatset(["119"], data_dir=DATA)


@pytest.fixture(scope="module")
def tiny_model(train_set: BeatSet, tmp_path_factory: pytest.TempPathFactory) -> BeatClassifier:
    torch.manual_seed(0)
    return fit_classifier(train_set, Run(dir=tmp_path_factory.mktemp("tiny"), progress_bar=False), TINY)


def test_slices_read_as_beat_sets(train_set: BeatSet, held_out: BeatSet) -> None:
    assert train_set.beats.shape == (len(train_set), 192) and train_set.beats.dtype == np.float32
    assert train_set.rr.shape == (len(train_set), 3) and train_set.labels.dtype == np.int64
    assert train_set.class_counts()["V"] > 50 and held_out.class_counts()["V"] > 20


def test_tiny_run_separates_v_from_n_on_an_unseen_patient(tiny_model: BeatClassifier, held_out: BeatSet) -> None:
    proba = predict_proba(tiny_model, held_out.beats, held_out.rr)
    assert proba.shape == (len(held_out), 5) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    pred = proba.argmax(axis=1)
    is_v, is_n = held_out.labels == V, held_out.labels == N
    v_se = np.mean(pred[is_v] == V)
    n_spec = np.mean(pred[is_n] != V)
    # Chance (or "always N", or "always V") gives a balanced accuracy of 0.5.
    assert (v_se + n_spec) / 2 > 0.8, (v_se, n_spec)
    m = evaluate_classifier(tiny_model, held_out)
    assert m["per_class"]["V"]["f1"] > 0.6


def test_fit_reports_out_of_fold_validation(tiny_model: BeatClassifier) -> None:
    val = tiny_model.validation  # type: ignore[attr-defined]
    json.dumps(val)  # plain data, for reports
    assert val["records"] == ["105"]
    assert val["per_class"]["N"]["support"] + val["per_class"]["V"]["support"] == val["n"]
    assert len(tiny_model.members) == 1


def test_record_folds_make_an_ensemble_scored_out_of_fold(train_set: BeatSet, tmp_path: Path) -> None:
    folds = (("100", "105"), ("208",), ("232",))
    cfg = ClassifierConfig(**{**TINY.to_dict(), "val_records": (), "val_folds": folds, "epochs": 2,
                              "min_epochs": 2, "samples_per_epoch": 256})
    model = fit_classifier(train_set, Run(dir=tmp_path, progress_bar=False), cfg)
    assert len(model.members) == 3
    val = model.validation  # type: ignore[attr-defined]
    assert val["records"] == ["100", "105", "208", "232"] and val["n"] == len(train_set)
    assert val["without_bias"]["n"] == len(train_set)
    bias = model.logit_bias.numpy()
    assert bias[N] == 0 and bias[Q] == 0 and np.all(np.abs(bias) <= 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["member"] for r in rows if "member" in r] == [0, 0, 1, 1, 2, 2]
    assert rows[-1]["phase"] == "out-of-fold"


def test_restarts_keep_the_ensemble_with_the_best_held_out_score(train_set: BeatSet, tmp_path: Path) -> None:
    cfg = ClassifierConfig(**{**TINY.to_dict(), "epochs": 2, "min_epochs": 2, "samples_per_epoch": 256, "restarts": 3})
    model = fit_classifier(train_set, Run(dir=tmp_path, progress_bar=False), cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val_macro_f1"] for r in rows if r.get("phase") == "restart"]
    assert [r["restart"] for r in rows if r.get("phase") == "restart"] == [0, 1, 2]
    assert len(set(scores)) > 1, "restarts with other seeds should not score alike"
    kept = rows[-1]
    assert kept["phase"] == "out-of-fold" and scores[int(kept["restart"])] == max(scores)
    assert kept["val_macro_f1"] == max(scores) and len(model.members) == 1
    # Each restart trained in its own run directory (in worker processes where the CPUs allow);
    # the run's checkpoint holds the ensemble that was kept, equal to its restart's own.
    for r in range(3):
        sub = torch.load(tmp_path / f"restart-{r}" / "checkpoint.pt", weights_only=False)
        assert sub["config"]["seed"] == TINY.seed + r and sub["config"]["restarts"] == 1
    loaded = load_classifier(tmp_path / "checkpoint.pt")
    alone = load_classifier(tmp_path / f"restart-{int(kept['restart'])}" / "checkpoint.pt")
    beats, rr = torch.from_numpy(train_set.beats[:50]), torch.from_numpy(train_set.rr[:50])
    with torch.no_grad():
        torch.testing.assert_close(loaded(beats, rr), model.eval()(beats, rr))
        torch.testing.assert_close(alone(beats, rr), model(beats, rr))
    with pytest.raises(ValueError, match="at least 1"):
        ClassifierConfig(restarts=0)


def test_a_restart_trains_the_same_in_a_worker_process_as_in_process(
    train_set: BeatSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ClassifierConfig(**{**TINY.to_dict(), "epochs": 2, "min_epochs": 2, "samples_per_epoch": 256, "restarts": 2})
    results = {}
    for cpus in (2, 1):  # two CPUs: the restarts run in worker processes; one: in this process
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        results[cpus] = fit_classifier(train_set, Run(dir=tmp_path / str(cpus), progress_bar=False), cfg)
    for r in range(2):
        a = torch.load(tmp_path / "2" / f"restart-{r}" / "checkpoint.pt", weights_only=False)["members_done"]
        b = torch.load(tmp_path / "1" / f"restart-{r}" / "checkpoint.pt", weights_only=False)["members_done"]
        for wa, wb in zip(a, b):
            for name in wb:
                assert torch.equal(wa[name], wb[name]), name
    assert results[2].validation == results[1].validation  # type: ignore[attr-defined]


def test_forward_shapes_and_raw_rr_seconds() -> None:
    model = BeatClassifier(channels=(4, 8, 8, 8), hidden=8, members=3).eval()
    beats = torch.randn(7, 192)
    rr = torch.tensor([[0.8, 0.8, 0.8]] * 6 + [[0.0, 0.0, 0.0]])  # a stream's first beat: no RR yet
    with torch.no_grad():
        out = model(beats, rr)
    assert out.shape == (7, 5) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # A premature beat changes the RR features by ratio, whatever the heart rate.
    f = BeatClassifier.rr_features(torch.tensor([[0.4, 0.8, 0.8], [0.75, 1.5, 1.5]]))
    torch.testing.assert_close(f[0, 3:], f[1, 3:])


def test_metrics_on_a_hand_made_case() -> None:
    # 4 N, 2 S, 3 V, no F, no Q. One N called S, one N called V, two V called N.
    ref = np.array([N, N, N, N, S, S, V, V, V])
    hyp = np.array([N, N, S, V, S, S, V, N, N])
    cm = confusion_matrix(ref, hyp)
    assert cm.tolist() == [
        [2, 1, 1, 0, 0],
        [0, 2, 0, 0, 0],
        [2, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    m = metrics_from_confusion(cm)
    pc = m["per_class"]
    assert pc["N"]["se"] == pytest.approx(2 / 4) and pc["N"]["ppv"] == pytest.approx(2 / 4)
    assert pc["S"]["se"] == pytest.approx(2 / 2) and pc["S"]["ppv"] == pytest.approx(2 / 3)
    assert pc["S"]["f1"] == pytest.approx(0.8) and pc["S"]["predicted"] == 3
    assert pc["V"]["se"] == pytest.approx(1 / 3) and pc["V"]["ppv"] == pytest.approx(1 / 2)
    assert pc["V"]["f1"] == pytest.approx(0.4) and pc["V"]["support"] == 3
    assert pc["F"] == {"se": None, "ppv": None, "f1": None, "support": 0, "predicted": 0}
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.4) / 3)  # over N, S, V: the classes present
    assert m["confusion"] == cm.tolist()


class _RuleModel(torch.nn.Module):
    """Calls a beat V when it is premature (pre-RR < 70% of local), else N: a known answer."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, beats: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        premature = (rr[:, 0] < 0.7 * rr[:, 1]).float()
        logits = torch.zeros(len(beats), 5)
        logits[:, N] = 1 - premature
        logits[:, V] = premature
        return logits


def test_evaluate_classifier_against_a_rule_with_a_known_answer() -> None:
    # pre/local: 1.0, 0.5, 0.625, 0.99, 0.975 -> the rule says N, V, V, N, N.
    rr = np.array([[0.8, 0.8, 0.8], [0.4, 0.8, 0.8], [0.5, 0.8, 0.8], [0.79, 0.8, 0.8], [0.78, 0.8, 0.8]],
                  dtype=np.float32)
    labels = np.array([N, V, N, V, V])
    data = BeatSet(np.zeros((5, 192), np.float32), labels, rr, np.array(["x"] * 5), np.arange(5),
                   np.ones(5, np.float32))
    m = evaluate_classifier(_RuleModel(), data)
    assert m["confusion"][N][:3] == [1, 0, 1] and m["confusion"][V][:3] == [2, 0, 1]
    assert m["per_class"]["V"]["se"] == pytest.approx(1 / 3) and m["per_class"]["V"]["ppv"] == 0.5
    assert m["per_class"]["S"]["ppv"] is None and m["accuracy"] == pytest.approx(2 / 5)


class _Killed(Exception):
    pass


class _KilledAfter(Run):
    """A run whose process dies right after writing the checkpoint of a given epoch."""

    kill_at: int = 1

    def save_checkpoint(self, state: dict) -> None:
        super().save_checkpoint(state)
        if state["epoch"] == self.kill_at and not state["member_finished"]:
            raise _Killed


def _steps(run_dir: Path) -> list[tuple[int, int | None]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("epoch")) for r in rows if "epoch" in r]


def test_resume_continues_the_epoch_count(train_set: BeatSet, tmp_path: Path) -> None:
    cfg = ClassifierConfig(**{**TINY.to_dict(), "epochs": 4, "min_epochs": 4, "samples_per_epoch": 256})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(_Killed):
        fit_classifier(train_set, _KilledAfter(dir=tmp_path / "a", progress_bar=False), cfg)
    assert _steps(tmp_path / "a") == [(0, 0), (1, 1)]
    resumed = fit_classifier(train_set, Run(dir=tmp_path / "a", progress_bar=False), cfg)
    assert _steps(tmp_path / "a") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # Model, optimiser, schedule and RNG states all came back: the last epoch's weights (not only the
    # best ones, which may predate the break) equal those of an unbroken run.
    straight = fit_classifier(train_set, Run(dir=tmp_path / "b", progress_bar=False), cfg)
    last_a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    last_b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for name, value in last_b.items():
        torch.testing.assert_close(last_a[name], value, msg=name)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # A finished run resumes to the same model without training again.
    again = fit_classifier(train_set, Run(dir=tmp_path / "b", progress_bar=False), cfg)
    assert len(_steps(tmp_path / "b")) == 4
    torch.testing.assert_close(again.members[0].head[-1].weight, straight.members[0].head[-1].weight)


def test_resume_refuses_another_configuration(train_set: BeatSet, tmp_path: Path) -> None:
    cfg = ClassifierConfig(**{**TINY.to_dict(), "epochs": 1, "min_epochs": 1, "samples_per_epoch": 64})
    fit_classifier(train_set, Run(dir=tmp_path, progress_bar=False), cfg)
    with pytest.raises(ValueError, match="another configuration"):
        fit_classifier(train_set, Run(dir=tmp_path, progress_bar=False), ClassifierConfig(**{**cfg.to_dict(), "lr": 1.0}))


def test_validation_records_must_be_in_the_training_set(train_set: BeatSet) -> None:
    with pytest.raises(ValueError, match="not in the training set"):
        split_validation(train_set, ["119"])
    fit, val = split_validation(train_set, ["105"])
    assert set(val.record) == {"105"} and "105" not in set(fit.record)


def test_onnx_export_matches_torch_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = BeatClassifier(members=2).eval()
    model.logit_bias.copy_(torch.tensor([0.0, -0.5, 0.25, 0.0, 0.0]))
    path = export_onnx(model, tmp_path / "classifier.onnx")
    sess = onnx_session(path)
    assert [i.name for i in sess.get_inputs()] == ["beats", "rr"]
    assert [i.shape for i in sess.get_inputs()] == [["batch", 192], ["batch", 3]]
    rng = np.random.default_rng(0)
    for n in (1, 37):
        beats = rng.normal(0, 0.3, (n, 192)).astype(np.float32)
        rr = rng.uniform(0.3, 1.6, (n, 3)).astype(np.float32)
        got = sess.run(["logits"], {"beats": beats, "rr": rr})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(beats), torch.from_numpy(rr)).numpy()
        assert got.shape == (n, 5)
        assert np.abs(got - want).max() < 1e-4


def test_classification_table_sets_ours_beside_the_published_rows() -> None:
    cm = np.zeros((5, 5), dtype=np.int64)
    cm[N, N], cm[S, S], cm[S, N], cm[V, V], cm[F, F] = 90, 3, 1, 8, 1
    table = classification_table(metrics_from_confusion(cm), name="ours")
    lines = table.splitlines()
    assert lines[0].startswith("| method | N Se | N +P | N F1 | S Se")
    assert len(lines) == 3 + len(PUBLISHED)
    assert lines[2].startswith("| ours | 100.0 | 98.9 | 99.4 | 75.0 | 100.0 | 85.7 |")
    chazal = next(line for line in lines if line.startswith("| de Chazal"))
    se, ppv = PUBLISHED["de Chazal et al. 2004"]["V"]["se"], PUBLISHED["de Chazal et al. 2004"]["V"]["ppv"]
    assert f"{2 * se * ppv / (se + ppv):.1f}" in chazal
    assert AAMI_CLASSES[:4] == ("N", "S", "V", "F")
