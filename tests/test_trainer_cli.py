"""`ecg-trainer fit` then `export`, end to end on the committed MIT-BIH slices, with tiny configs.

What is checked is the plumbing a user relies on: run directories, options, metrics log, resume,
export with the contract, parity, the model card, and that the edge loads what the trainer wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.models import ClassifierSession, GeneratorSession

DATA = Path(__file__).parent / "data"
TRAIN = ["100", "119", "208"]
EVAL = ["105", "232"]
TINY = {
    "classifier": ["epochs=2", "samples_per_epoch=512", "channels=4,8", "hidden=8", "val_records=208", "min_epochs=1"],
    "generator": ["steps=6", "log_every=2", "checkpoint_every=3", "widths=16,8", "stem_length=96",
                  "critic_widths=8,8", "critic_features=16", "sets_per_batch=4", "set_size=2", "critic_group=2"],
    "image-baseline": ["steps=4", "log_every=2", "checkpoint_every=2", "ngf=4", "ndf=4", "batch_size=8"],
}


def trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                         timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def fit(task: str, tmp: Path, *extra: str) -> Path:
    sets = [a for kv in TINY[task] for a in ("--set", kv)]
    out = trainer("fit", task, "--data-dir", str(DATA), "--train-records", *TRAIN, "--eval-records", *EVAL,
                  "--runs-dir", str(tmp / "runs"), "--cache-dir", str(tmp / "cache"), "--no-progress",
                  "--device", "cpu", *sets, *extra, cwd=tmp)
    return Path(out.stdout.strip().rsplit(" ", 1)[-1])


def test_dry_run_prints_options_and_writes_nothing(tmp_path: Path) -> None:
    out = trainer("fit", "generator", "--dry-run", "--set", "steps=7", "--seed", "3", "--runs-dir",
                  str(tmp_path / "runs"), cwd=tmp_path)
    options = json.loads(out.stdout)
    assert options["config"]["steps"] == 7 and options["seed"] == 3 and options["task"] == "generator"
    assert options["train_records"][0] == "101" and "codec.fs" in options["codec"]
    assert not (tmp_path / "runs").exists()


def test_thread_count_is_the_tasks_or_the_flag_and_is_restored(tmp_path: Path) -> None:
    import torch

    from trainer import pipeline

    before = torch.get_num_threads()
    common = {"data_dir": None, "runs_dir": str(tmp_path / "runs"), "cache_dir": None, "dry_run": True}
    # The classifier always trains on one thread (its result then repeats on any machine).
    assert pipeline.fit("classifier", [], **common)["threads"] == 1
    assert pipeline.fit("generator", [], **common)["threads"] == before
    assert pipeline.fit("generator", [], threads=1, **common)["threads"] == 1
    assert torch.get_num_threads() == before and not (tmp_path / "runs").exists()


def test_bad_override_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "classifier", "--dry-run", "--set", "epoch=3"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "no field 'epoch'" in out.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trainer")
    return {task: fit(task, tmp) for task in TINY} | {"tmp": tmp}


def test_fit_writes_a_run_directory(runs: dict[str, Path]) -> None:
    for task in TINY:
        run = runs[task]
        assert run.parent.name == task and run.name == "001"
        options = json.loads((run / "options.json").read_text())
        assert options["task"] == task and options["train_records"] == TRAIN and options["device"] == "cpu"
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert lines and all("step" in row for row in lines)
        assert (run / "model.pt").is_file() and (run / "checkpoint.pt").is_file()
    evaluation = json.loads((runs["classifier"] / "evaluation.json").read_text())
    assert evaluation["records"] == EVAL and evaluation["n"] > 250


def test_export_classifier_loads_on_the_edge(runs: dict[str, Path]) -> None:
    out = trainer("export", str(runs["classifier"]), "--output", str(runs["tmp"] / "m" / "classifier.onnx"),
                  "--version", "1.2.3", cwd=runs["tmp"])
    assert "max abs error vs torch" in out.stdout
    session = ClassifierSession(runs["tmp"] / "m" / "classifier.onnx")
    assert session.contract.version == "1.2.3" and session.contract.extra["training.records"] == "100,119,208"
    assert "macro_f1" in json.loads(session.contract.extra["metrics.ds2"])
    assert session.classify(np.zeros((5, 192)), np.full((5, 3), 0.8)).shape == (5,)
    card = (runs["tmp"] / "m" / "classifier.md").read_text()
    assert "de Chazal" in card and "Confusion matrix" in card and session.sha256 in card


def test_export_generator_with_card_and_baseline(runs: dict[str, Path]) -> None:
    onnx_path = runs["tmp"] / "m" / "generator.onnx"
    trainer("export", str(runs["generator"]), "--output", str(onnx_path), "--baseline", str(runs["image-baseline"]),
            "--data-dir", str(DATA), "--cache-dir", str(runs["tmp"] / "cache"), cwd=runs["tmp"])
    session = GeneratorSession(onnx_path)
    c = session.contract
    beats = session.generate(np.zeros((3, c.persona_dim)), np.zeros((3, c.beat_dim)), np.array([0, 2, 1]),
                             np.full((3, 2), 0.8))
    assert beats.shape == (3, 192) and np.isfinite(beats).all()
    card = onnx_path.with_suffix(".md").read_text()
    assert "image baseline" in card and "1-D GAN" in card and "generator.png" in card
    assert onnx_path.with_suffix(".png").stat().st_size > 10_000


def test_a_generator_export_that_cannot_be_measured_leaves_no_model(runs: dict[str, Path]) -> None:
    # The card measures fidelity on the run's eval records; without them the export fails
    # before it writes anything, so no unmeasured model sits where one is expected.
    empty = runs["tmp"] / "train-records-only"
    empty.mkdir()
    for f in DATA.iterdir():
        if f.stem in TRAIN:
            shutil.copy(f, empty)
    out_dir = runs["tmp"] / "unmeasured"
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "export", str(runs["generator"]), "--output",
                          str(out_dir / "generator.onnx"), "--data-dir", str(empty)],
                         capture_output=True, text=True, timeout=300, cwd=runs["tmp"])
    assert out.returncode != 0 and "105" in out.stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_export_image_baseline_writes_the_weights_the_evaluation_loads(runs: dict[str, Path]) -> None:
    from trainer.evaluate import load_baseline
    from trainer.pipeline import load_run

    weights = runs["tmp"] / "m" / "image-baseline.pt"
    out = trainer("export", str(runs["image-baseline"]), "--output", str(weights), cwd=runs["tmp"])
    assert "exported the image baseline's weights" in out.stdout
    labels = np.arange(6) % 5
    from_run = load_run(runs["image-baseline"])["module"].sample(labels, np.random.default_rng(2))
    assert np.array_equal(load_baseline(weights).sample(labels, np.random.default_rng(2)), from_run)
    assert np.array_equal(load_baseline(runs["image-baseline"]).sample(labels, np.random.default_rng(2)), from_run)
    with pytest.raises(FileNotFoundError, match="no image baseline at"):
        load_baseline(runs["tmp"] / "missing.pt")


def test_generator_class_term_reads_surrogates_with_a_trained_classifier(runs: dict[str, Path]) -> None:
    run = fit("generator", runs["tmp"], "--set", "class_weight=1", "--set", f"classifier_run={runs['classifier']}")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["class_loss"] for row in lines if "class_loss" in row]
    assert len(losses) == len(lines) and all(0 < v < 10 for v in losses)  # cross-entropy over 5 classes
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "generator", "--dry-run", "--set", "class_weight=1"],
                         capture_output=True, text=True, cwd=runs["tmp"])
    assert out.returncode != 0 and "needs classifier_run" in out.stderr


def test_memorisation_sweep_writes_its_table(runs: dict[str, Path]) -> None:
    out_dir = runs["tmp"] / "memo"
    sets = [a for kv in TINY["generator"] if not kv.startswith("steps") for a in ("--set", kv)]
    trainer("memorisation", "--data-dir", str(DATA), "--hold-out", "119", "--train-records", "208", "--steps", "2", "4",
            "--runs-dir", str(runs["tmp"] / "runs"), "--cache-dir", str(runs["tmp"] / "cache"), "--output",
            str(out_dir), *sets, cwd=runs["tmp"])
    report = json.loads((out_dir / "memorisation.json").read_text())
    assert [r["steps"] for r in report["rows"]] == [2, 4] and report["hold_out"] == ["119"]
    assert all(0.0 <= r["membership_auc"] <= 1.0 for r in report["rows"])
    assert all(len(r["membership_draws"]) == 10 and r["membership_auc"] == np.mean(r["membership_draws"])
               for r in report["rows"])  # the mean over attack draws
    assert 0.0 <= report["class_mean_reference_auc"] <= 1.0
    assert "| 4 |" in (out_dir / "memorisation.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "trainer.cli", "memorisation", "--hold-out", "100"],
                         capture_output=True, text=True, cwd=runs["tmp"])
    assert bad.returncode != 0 and "not in DS1: 100" in bad.stderr


def test_resume_continues_the_same_run(runs: dict[str, Path]) -> None:
    run = runs["image-baseline"]
    before = (run / "metrics.jsonl").read_text().splitlines()
    out = trainer("fit", "image-baseline", "--resume", str(run), "--data-dir", str(DATA), "--cache-dir",
                  str(runs["tmp"] / "cache"), "--no-progress", "--device", "cpu", cwd=runs["tmp"])
    assert out.stdout.strip().endswith(str(run))
    assert not (run.parent / "002").exists()
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # the log is appended to, never rewritten
