"""AAMI beat classifier: the class (N, S, V, F, Q) the edge assigns to every beat it replaces.

The class is a promise of the product (a surrogate keeps the class of the beat it replaces), so the
classifier must hold up on people it has never seen: it is trained on the de Chazal DS1 records,
selected on DS1 records held out whole, and measured once on DS2 (inter-patient, as published).

Why the model looks the way it does:

* **Input = what the edge has.** One canonical beat from the shared codec (R at index 64, 250 Hz,
  baseline removed, amplitude normalised) and the three causal RR intervals the edge keeps
  (previous RR, mean of the last 10, mean of the last 300), in raw seconds. Every transform of the
  RR intervals happens inside ``forward``, so the ONNX graph is the whole model and the edge cannot
  disagree with the trainer about it.
* **Rhythm relative to the wearer.** Supraventricular ectopic beats mostly look normal; what gives
  them away across patients is prematurity relative to the wearer's own rhythm. ``forward`` turns the
  RR intervals into log seconds and log ratios (pre/local, pre/long, local/long), which are the same
  for a premature beat at 50 and at 120 bpm.
* **Morphology by a small 1-D CNN.** Four conv/ReLU/max-pool stages keep the position of every wave
  relative to R (flattened, not globally pooled: a P wave before R and a T wave after it are
  different things): about 1.2 MFLOP per member and beat, 4 members, several thousand beats per
  second through onnxruntime on one CPU core.
* **Imbalance.** DS1 has about 45,800 N, 3,800 V, 940 S, 410 F and 8 Q beats. Each epoch draws a
  fixed number of training beats with class mass proportional to ``count ** sampling_power``
  (0 = balanced, 1 = as found), so rare classes are seen often without a loss weight that would
  make every N beat nearly free.
* **Augmentation for unseen people.** Time stretch about R (wave durations differ between people;
  without it whole bundle-branch-block records come out as V), small amplitude changes, shifts of a
  sample or two (the edge's R-peak is not the annotator's), noise, baseline tilt and RR jitter:
  cheap stand-ins for the variation between patients that 16-17 training records cannot show.
* **Selection on held-out DS1 records.** DS1 is cut into record folds (``DS1_FOLDS``); ensemble
  member k trains on the other folds and keeps its best epoch on fold k (macro F1 of whole records
  it never saw). The members' out-of-fold predictions score every DS1 record as an unseen patient,
  which is the validation figure every default of this module was chosen on; DS2 is never looked at.
  Averaging the members' logits damps the per-patient swings a single small net shows, and a
  per-class ``logit_bias`` fitted on the out-of-fold predictions moves the decision thresholds from
  the class-balanced training prior to the ones that score best on unseen records.

The figures reached, and how to reproduce them, are in docs/classifier.md (``main_experiment``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.records import AAMI_CLASSES, PACED
from trainer.dataset import BeatSet
from trainer.runs import Run, seed_everything, unwrap

log = logging.getLogger(__name__)

#: Canonical beat length the model takes (edge.codec.DEFAULT_SPEC at 250 Hz).
BEAT_LENGTH = 192
#: Canonical index of the R-peak.
R_INDEX = 64
#: RR features the model derives inside ``forward`` from (pre, local, long) seconds.
RR_DERIVED = ("log_pre", "log_local", "log_long", "log_pre/local", "log_pre/long", "log_local/long")
#: RR intervals are clamped to this range (seconds) before logs: 0.2 .. 3 s covers 20-300 bpm;
#: a stream's very first beat (no RR yet) or a dropout cannot produce an infinite feature.
RR_MIN_S = 0.2
RR_MAX_S = 3.0


#: Default record folds of DS1 for the ensemble (each member holds one fold out for early stopping).
#: Each fold holds S beats, V beats and a bundle-branch-block record; F sits in folds 2 and 4.
DS1_FOLDS: tuple[tuple[str, ...], ...] = (
    ("209", "106", "118", "112", "115", "230"),
    ("201", "208", "109", "122", "101"),
    ("207", "119", "220", "114", "116", "205"),
    ("223", "203", "124", "215", "108"),
)


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides a training run (recorded in the run's options)."""

    epochs: int = 30  # most epochs per member; early stopping usually ends sooner
    samples_per_epoch: int = 16_384  # training beats drawn per epoch (with replacement, class-balanced)
    batch_size: int = 256  # beats per optimiser step
    lr: float = 3e-3  # AdamW peak learning rate (one-cycle schedule over ``epochs``)
    weight_decay: float = 1e-3  # AdamW decoupled weight decay
    dropout: float = 0.2  # dropout before the last layer
    label_smoothing: float = 0.05  # cross-entropy label smoothing (soft targets resist overconfidence)
    sampling_power: float = 0.5  # class mass in an epoch ~ count**power (0 balanced, 1 natural)
    class_weight_power: float = 0.0  # loss weight ~ count**-power (0: no loss weighting)
    augment: bool = True  # time stretch, shift, amplitude, noise, baseline and RR jitter on training beats
    warp: float = 0.2  # time stretch about R by up to this fraction (augmentation)
    channels: tuple[int, ...] = (16, 32, 32, 32)  # conv widths, one per conv/pool stage
    hidden: int = 64  # width of the dense layer after the conv trunk
    fusion: str = "concat"  # RR into the net: "concat" (dense layer input), "additive" (own logits), "both"
    patience: int = 8  # epochs without a better validation score before a member stops
    min_epochs: int = 6  # never stop a member before this many epochs
    seed: int = 0  # seeds torch, numpy and the epoch sampler (member k uses seed + k)
    #: DS1 record folds: one ensemble member per fold, trained on the other folds and early-stopped
    #: on its own; a single fold gives a single model. Records absent from the training set are an error.
    val_folds: tuple[tuple[str, ...], ...] = DS1_FOLDS
    #: one held-out record set instead of the folds: a single model early-stopped on these records
    #: (for training sets other than DS1, e.g. a few records); empty = use ``val_folds``.
    val_records: tuple[str, ...] = ()
    #: classes scored by the validation criterion (macro F1 over these, where present in the fold).
    val_classes: tuple[str, ...] = ("N", "S", "V", "F")
    #: fit ``logit_bias`` for S, V and F on the out-of-fold DS1 predictions (needs two folds or more).
    fit_bias: bool = True
    #: whole ensembles trained, restart r with member seeds ``seed + r + k``; the one with the best
    #: out-of-fold DS1 macro F1 is kept (a small net's result swings between seeds; DS1 decides).
    restarts: int = 3

    def __post_init__(self) -> None:
        # Overrides may arrive as lists (JSON, the command line); keep one hashable, comparable form.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "val_folds", tuple(tuple(str(r) for r in f) for f in self.val_folds))
        object.__setattr__(self, "val_records", tuple(str(r) for r in self.val_records))
        object.__setattr__(self, "val_classes", tuple(self.val_classes))
        if self.fusion not in ("concat", "additive", "both"):
            raise ValueError(f"fusion must be concat, additive or both, not {self.fusion!r}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {self.restarts}")

    @property
    def folds(self) -> tuple[tuple[str, ...], ...]:
        """The held-out record sets, one ensemble member each."""
        return (self.val_records,) if self.val_records else self.val_folds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Trunk(nn.Module):
    """One member: conv trunk on the beat, RR features fused by concatenation and/or added logits."""

    def __init__(
        self, channels: Sequence[int], hidden: int, dropout: float, n_rr: int, n_classes: int, fusion: str
    ) -> None:
        super().__init__()
        self.fusion = fusion
        layers: list[nn.Module] = []
        c_in, length = 1, BEAT_LENGTH
        for i, c_out in enumerate(channels):
            k = 7 if i == 0 else 5 if i < 3 else 3
            layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out), nn.ReLU(), nn.MaxPool1d(2)]
            c_in, length = c_out, length // 2
        self.conv = nn.Sequential(*layers)
        n_cat = 16 if fusion in ("concat", "both") else 0
        self.rr = nn.Sequential(nn.Linear(n_rr, 16), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(c_in * length + n_cat, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )
        # Additive RR evidence: logits += g(rr), the same for every morphology (naive-Bayes-like).
        self.rr_logits = nn.Linear(16, n_classes) if fusion in ("additive", "both") else None

    def forward(self, x: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        r = self.rr(rr)
        out = self.head(torch.cat([h, r], dim=1) if self.fusion in ("concat", "both") else h)
        if self.rr_logits is not None:
            out = out + self.rr_logits(r)
        return out


class BeatClassifier(nn.Module):
    """Canonical beat + raw RR seconds -> AAMI class logits.

    ``forward(beats [B, 192] float32, rr [B, 3] float32 seconds) -> logits [B, 5]`` in the order of
    ``AAMI_CLASSES``. RR normalisation happens here, so the exported graph takes what the edge has.
    """

    classes: tuple[str, ...] = AAMI_CLASSES

    def __init__(
        self,
        channels: Sequence[int] = ClassifierConfig.channels,
        hidden: int = ClassifierConfig.hidden,
        dropout: float = ClassifierConfig.dropout,
        members: int = 1,
        fusion: str = ClassifierConfig.fusion,
    ) -> None:
        super().__init__()
        if fusion not in ("concat", "additive", "both"):
            raise ValueError(f"fusion must be concat, additive or both, not {fusion!r}")
        self.config = {"channels": list(channels), "hidden": hidden, "dropout": dropout, "members": members,
                       "fusion": fusion}
        self.members = nn.ModuleList(
            _Trunk(channels, hidden, dropout, len(RR_DERIVED), len(AAMI_CLASSES), fusion) for _ in range(members)
        )
        # Per-class offset added to the averaged logits: moves the decision thresholds from the
        # class-balanced training prior to the ones that score best on held-out DS1 records.
        self.register_buffer("logit_bias", torch.zeros(len(AAMI_CLASSES)))

    @staticmethod
    def rr_features(rr: torch.Tensor) -> torch.Tensor:
        """(B, 3) seconds -> (B, 6): log pre/local/long and their log ratios (see RR_DERIVED)."""
        lr = torch.log(rr.clamp(RR_MIN_S, RR_MAX_S))
        pre, local, long = lr[:, 0:1], lr[:, 1:2], lr[:, 2:3]
        # Centre the logs on 0.8 s (75 bpm) so every feature is O(1) at the input of the network.
        centre = math.log(0.8)
        return torch.cat([pre - centre, local - centre, long - centre, pre - local, pre - long, local - long], dim=1)

    def member_logits(self, beats: torch.Tensor, rr: torch.Tensor) -> list[torch.Tensor]:
        x = beats.unsqueeze(1)
        f = self.rr_features(rr)
        return [m(x, f) for m in self.members]

    def forward(self, beats: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(beats, rr)
        mean = logits[0] if len(logits) == 1 else torch.stack(logits, dim=0).mean(dim=0)
        return mean + self.logit_bias


# -- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def predict_proba(model: nn.Module, beats: np.ndarray, rr: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities (n, 5), float32, in the order of ``AAMI_CLASSES``."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = np.empty((len(beats), len(AAMI_CLASSES)), dtype=np.float32)
    try:
        for i in range(0, len(beats), batch_size):
            b = torch.as_tensor(np.asarray(beats[i : i + batch_size], dtype=np.float32), device=device)
            r = torch.as_tensor(np.asarray(rr[i : i + batch_size], dtype=np.float32), device=device)
            out[i : i + batch_size] = torch.softmax(net(b, r), dim=1).cpu().numpy()
    finally:
        net.train(was_training)
    return out


def metrics_from_confusion(confusion: np.ndarray, classes: Sequence[str] = AAMI_CLASSES) -> dict[str, Any]:
    """Per-class Se, +P, F1 and support, accuracy and macro F1 from a confusion matrix.

    Rows are the reference class, columns the predicted one. A figure whose denominator is zero is
    None (Se of a class with no beats, +P of a class never predicted). Macro F1 averages the classes
    with at least one reference beat.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    per_class: dict[str, dict[str, float | int | None]] = {}
    f1s: list[float] = []
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        se = tp / support if support else None
        ppv = tp / predicted if predicted else None
        denom = support + predicted  # 2TP + FN + FP
        f1 = 2 * tp / denom if denom else None
        per_class[name] = {"se": se, "ppv": ppv, "f1": f1, "support": support, "predicted": predicted}
        if support and f1 is not None:
            f1s.append(f1)
    total = int(cm.sum())
    return {
        "classes": list(classes),
        "per_class": per_class,
        "confusion": cm.tolist(),
        "accuracy": float(np.trace(cm) / total) if total else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "n": total,
    }


def confusion_matrix(reference: np.ndarray, predicted: np.ndarray, n_classes: int = len(AAMI_CLASSES)) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = reference class, columns = predicted class."""
    idx = np.asarray(reference, dtype=np.int64) * n_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def evaluate_classifier(model: nn.Module, data: BeatSet) -> dict[str, Any]:
    """Score ``model`` on every beat of ``data`` (argmax class against the reference labels)."""
    proba = predict_proba(model, data.beats, data.rr)
    return metrics_from_confusion(confusion_matrix(data.labels, proba.argmax(axis=1)))


def macro_f1(metrics: Mapping[str, Any], classes: Sequence[str]) -> float:
    """Mean F1 over ``classes`` that have reference beats in ``metrics``."""
    vals = [metrics["per_class"][c]["f1"] for c in classes if metrics["per_class"][c]["support"]]
    return float(np.mean(vals)) if vals else 0.0


# -- training -----------------------------------------------------------------------------------


def split_validation(train: BeatSet, val_records: Sequence[str]) -> tuple[BeatSet, BeatSet]:
    """Whole records out: (training beats, validation beats). Paced records are dropped from both."""
    keep = ~np.isin(train.record, PACED)
    is_val = np.isin(train.record, list(val_records))
    missing = sorted(set(val_records) - set(np.unique(train.record).tolist()))
    if missing:
        raise ValueError(f"validation records {missing} are not in the training set")
    fit, val = train.subset(keep & ~is_val), train.subset(keep & is_val)
    if len(fit) == 0:
        raise ValueError("no training beats left after holding out the validation records")
    return fit, val


def sampling_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-beat draw probabilities: each class's total mass ~ count**power."""
    counts = np.bincount(labels, minlength=len(AAMI_CLASSES)).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1.0) ** (power - 1.0), 0.0)
    w = per_class[labels]
    return w / w.sum()


def sample_at(beats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``beats`` (..., L) read at fractional sample positions ``pos`` (broadcast to ``beats``'
    shape) by linear interpolation, positions clamped to the beat: time warps about R."""
    n = beats.shape[-1]
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long().clamp(0, n - 2)
    frac = (pos - lo).expand(beats.shape)
    lo = lo.expand(beats.shape)
    return torch.gather(beats, -1, lo) * (1 - frac) + torch.gather(beats, -1, lo + 1) * frac


def augment_batch(
    beats: torch.Tensor, rr: torch.Tensor, gen: torch.Generator, warp: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random, label-preserving perturbations of a training batch (see the module docstring)."""
    b, n = beats.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)
    # Shift by -2..2 samples (the edge's R-peak sits within a sample or two of the annotator's),
    # and stretch or squeeze time about R by up to ``warp`` (wave durations differ between people).
    shift = torch.randint(-2, 3, (b, 1), generator=gen).float()
    stretch = 1.0 + warp * (2 * u(b, 1) - 1)
    x = sample_at(beats, (torch.arange(n).float().unsqueeze(0) - R_INDEX) / stretch + R_INDEX - shift)
    x = x * (0.85 + 0.3 * u(b, 1))  # amplitude
    t = torch.linspace(-1.0, 1.0, n).unsqueeze(0)
    x = x + 0.05 * (u(b, 1) - 0.5) * t + 0.03 * (u(b, 1) - 0.5)  # baseline tilt and offset
    x = x + 0.02 * u(b, 1) * torch.randn(b, n, generator=gen)  # broadband noise
    r = rr * (0.9 + 0.2 * u(b, 1))  # rate: the same beat at a slightly different heart rate
    r = r * torch.cat([1.0 + 0.06 * (u(b, 1) - 0.5), torch.ones(b, 2)], dim=1)  # prematurity jitter
    return x, r


def _rng_state(np_rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    return {"numpy": np_rng.bit_generator.state, "torch": torch.get_rng_state(), "augment": gen.get_state()}


def _set_rng_state(state: Mapping[str, Any], np_rng: np.random.Generator, gen: torch.Generator) -> None:
    np_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    gen.set_state(state["augment"])


def _model_config(cfg: ClassifierConfig, members: int) -> dict[str, Any]:
    return {"channels": list(cfg.channels), "hidden": cfg.hidden, "dropout": cfg.dropout, "members": members,
            "fusion": cfg.fusion}


def fit_classifier(train: BeatSet, run: Run, cfg: ClassifierConfig = ClassifierConfig()) -> BeatClassifier:
    """Train on ``train`` (DS1): ``cfg.restarts`` whole ensembles, keep the best out of fold.

    Restart r is a complete ensemble (``_fit_ensemble``, member seeds ``seed + r + k``) trained in
    its own run directory ``restart-r`` with its own metrics log and checkpoint, so each one resumes
    on its own. On the CPU with one process (no ``torchrun``) the restarts train side by side in
    worker processes, as many as the CPUs allow at the current torch thread count; a restart gives
    the same weights in a worker as in this process. The one with the best out-of-fold DS1 macro F1
    is returned, logged (``phase: restart`` rows, then ``out-of-fold``) and checkpointed here.
    With ``restarts = 1`` the ensemble trains in ``run`` itself.
    """
    if cfg.restarts == 1:
        return _fit_ensemble(train, run, cfg)
    state = run.load_checkpoint()
    if state is not None and state.get("config") != cfg.to_dict():
        raise ValueError(f"{run.checkpoint_path} was written with another configuration; start a new run")
    subs = [dataclasses.replace(cfg, seed=cfg.seed + r, restarts=1) for r in range(cfg.restarts)]
    threads = torch.get_num_threads()
    workers = min(cfg.restarts, max(1, len(os.sched_getaffinity(0)) // threads))
    parallel = workers > 1 and run.world_size == 1 and run.device.type == "cpu"
    sub_runs = [dataclasses.replace(run, dir=run.dir / f"restart-{r}", progress_bar=run.progress_bar and not parallel)
                for r in range(cfg.restarts)]
    if run.is_main:
        for sub in sub_runs:
            sub.dir.mkdir(parents=True, exist_ok=True)
    run.barrier()
    if parallel:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        log.info("training %d restarts in %d worker processes (%d torch thread(s) each)", cfg.restarts, workers, threads)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_fit_restart, [train] * cfg.restarts, sub_runs, subs, [threads] * cfg.restarts,
                          [logging.getLogger().level] * cfg.restarts))
        models = [load_classifier(sub.checkpoint_path) for sub in sub_runs]
    else:
        models = [_fit_ensemble(train, sub, c) for sub, c in zip(sub_runs, subs)]
    scores = []
    for r, model in enumerate(models):
        scores.append(macro_f1(model.validation, cfg.val_classes))  # type: ignore[attr-defined]
        run.log(0, phase="restart", restart=r, val_macro_f1=scores[-1])
        log.info("restart %d: out-of-fold DS1 macro F1 %.4f", r, scores[-1])
    chosen = int(np.argmax(scores))  # the first of equals
    model = models[chosen]
    validation = model.validation  # type: ignore[attr-defined]
    _log_out_of_fold(run, 0, model, cfg, restart=chosen)
    kept = torch.load(sub_runs[chosen].checkpoint_path, map_location="cpu", weights_only=False)
    run.save_checkpoint({"config": cfg.to_dict(), "model_config": kept["model_config"], "restart": chosen,
                         "members_done": kept["members_done"], "logit_bias": model.logit_bias.clone(),
                         "validation": validation})
    return model


def _fit_restart(train: BeatSet, run: Run, cfg: ClassifierConfig, threads: int, log_level: int) -> None:
    """One restart in a worker process (its result is the checkpoint in ``run.dir``)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(name)s [{run.dir.name}] %(message)s", force=True)
    torch.set_num_threads(threads)
    _fit_ensemble(train, run, cfg)


def _log_out_of_fold(run: Run, step: int, model: BeatClassifier, cfg: ClassifierConfig, **extra: Any) -> None:
    validation = model.validation  # type: ignore[attr-defined]
    pc = validation["per_class"]
    run.log(step, phase="out-of-fold", **extra, val_macro_f1=macro_f1(validation, cfg.val_classes),
            val_macro_f1_without_bias=macro_f1(validation["without_bias"], cfg.val_classes),
            logit_bias=[round(float(v), 3) for v in model.logit_bias],
            **{f"val_{m}_{c}": pc[c][m] for c in AAMI_CLASSES for m in ("se", "ppv", "f1") if pc[c]["support"]})
    log.info("%sout-of-fold DS1 macro F1 %.4f (S F1 %.3f, V F1 %.3f), bias %s",
             f"restart {extra['restart']} kept: " if "restart" in extra else "", macro_f1(validation, cfg.val_classes),
             pc["S"]["f1"] or 0.0, pc["V"]["f1"] or 0.0, np.round(model.logit_bias.numpy(), 2).tolist())


def _fit_ensemble(train: BeatSet, run: Run, cfg: ClassifierConfig) -> BeatClassifier:
    """One ensemble: one member per fold of ``cfg.folds``, averaged in ``forward``.

    Member k (seed ``cfg.seed + k``) trains on every record outside fold k and keeps its best epoch
    on fold k (macro F1 over ``cfg.val_classes``). Every epoch is logged (``run.log``, step = epochs
    so far over all members) and checkpointed (``run.save_checkpoint``); a run directory that holds
    a checkpoint resumes from it: finished members, and the current member's model, optimiser,
    schedule, epoch, best weights and RNG states. The returned model carries ``validation``: the
    out-of-fold metrics on DS1, each beat scored by the member that never saw its record.
    """
    folds = list(cfg.folds)
    if not folds or not all(folds):
        raise ValueError("no held-out records: model selection needs val_folds (or val_records)")
    model_cfg = _model_config(cfg, 1)
    state = run.load_checkpoint()
    if state is not None and state.get("config") != cfg.to_dict():
        raise ValueError(f"{run.checkpoint_path} was written with another configuration; start a new run")
    done: list[dict[str, torch.Tensor]] = [] if state is None else list(state["members_done"])
    step = 0 if state is None else state["step"] + 1
    oof = np.full((len(train), len(AAMI_CLASSES)), np.nan, dtype=np.float32)
    for k, fold in enumerate(folds):
        fit, val = split_validation(train, fold)
        member = BeatClassifier(**model_cfg)
        if k < len(done):
            member.load_state_dict(done[k])
        else:
            resume = state if state is not None and state["member"] == k and not state["member_finished"] else None
            weights, step = _fit_member(model_cfg, fit, val, run, cfg, k, cfg.seed + k, step, resume, done)
            member.load_state_dict(weights)
            done.append(weights)
        mask = np.isin(train.record, fold) & ~np.isin(train.record, PACED)
        oof[mask] = predict_proba(member, train.beats[mask], train.rr[mask])
    model = _ensemble(model_cfg, done)
    _out_of_fold(model, train, oof, folds, cfg)
    _log_out_of_fold(run, step, model, cfg)
    final = run.load_checkpoint() if run.is_main else None
    if final is not None:  # the finished ensemble's extras, for load_classifier
        run.save_checkpoint({**final, "logit_bias": model.logit_bias.clone(), "validation": model.validation})  # type: ignore[attr-defined]
    return model


def _ensemble(model_cfg: Mapping[str, Any], members: Sequence[Mapping[str, torch.Tensor]]) -> BeatClassifier:
    """One BeatClassifier averaging the given single-member state dicts."""
    model = BeatClassifier(**{**model_cfg, "members": len(members)})
    for k, weights in enumerate(members):
        model.members[k].load_state_dict({key[len("members.0."):]: v for key, v in weights.items()
                                          if key.startswith("members.0.")})
    return model.eval()


def _out_of_fold(model: BeatClassifier, train: BeatSet, oof: np.ndarray, folds: Sequence[Sequence[str]],
                 cfg: ClassifierConfig) -> None:
    """Fit ``model.logit_bias`` on the out-of-fold probabilities and set ``model.validation``."""
    scored = ~np.isnan(oof[:, 0])
    log_p, labels, fold_of = np.log(oof[scored] + 1e-7), train.labels[scored], np.full(int(scored.sum()), -1)
    for k, fold in enumerate(folds):
        fold_of[np.isin(train.record[scored], fold)] = k
    raw = metrics_from_confusion(confusion_matrix(labels, log_p.argmax(axis=1)))
    if cfg.fit_bias and len(folds) > 1:
        # Cross-fitted: fold k's beats are scored with a bias fitted on the other folds only, so the
        # reported figure is still one on records that chose nothing about their own scoring.
        pred = np.empty(len(labels), dtype=np.int64)
        for k in range(len(folds)):
            bias_k = fit_logit_bias(log_p[fold_of != k], labels[fold_of != k], cfg.val_classes)
            pred[fold_of == k] = (log_p[fold_of == k] + bias_k).argmax(axis=1)
        validation = metrics_from_confusion(confusion_matrix(labels, pred))
        model.logit_bias.copy_(torch.as_tensor(fit_logit_bias(log_p, labels, cfg.val_classes), dtype=torch.float32))
    else:
        validation = raw
    model.validation = {  # type: ignore[attr-defined]
        **validation, "records": sorted(set(train.record[scored].tolist())), "without_bias": raw}


#: Candidate logit offsets for ``fit_logit_bias``.
BIAS_GRID: tuple[float, ...] = tuple(np.round(np.arange(-2.0, 2.01, 0.25), 2).tolist())


def fit_logit_bias(
    log_proba: np.ndarray, labels: np.ndarray, classes: Sequence[str] = ("N", "S", "V", "F"),
    grid: Sequence[float] = BIAS_GRID, sweeps: int = 3,
) -> np.ndarray:
    """Per-class logit offsets (N and Q fixed at 0) maximising macro F1 over ``classes``.

    Coordinate ascent over S, V and F on a coarse grid: a handful of numbers fitted on tens of
    thousands of held-out beats, a threshold choice rather than a second model.
    """
    bias = np.zeros(len(AAMI_CLASSES))

    def score(b: np.ndarray) -> float:
        return macro_f1(metrics_from_confusion(confusion_matrix(labels, (log_proba + b).argmax(axis=1))), classes)

    best = score(bias)
    for _ in range(sweeps):
        changed = False
        for c in (AAMI_CLASSES.index("S"), AAMI_CLASSES.index("V"), AAMI_CLASSES.index("F")):
            for v in grid:
                trial = bias.copy()
                trial[c] = v
                s = score(trial)
                if s > best + 1e-9:
                    best, bias, changed = s, trial, True
        if not changed:
            break
    return bias


def _fit_member(
    model_cfg: Mapping[str, Any], fit: BeatSet, val: BeatSet, run: Run, cfg: ClassifierConfig, k: int, seed: int,
    step: int, resume: Mapping[str, Any] | None, done: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], int]:
    """Train member ``k`` with early stopping on ``val``; return its best weights and the next step."""
    seed_everything(seed)
    member = BeatClassifier(**model_cfg)
    log.info("member %d: training beats %s, validation beats %s", k, fit.class_counts(), val.class_counts())
    net = run.wrap(member)
    # Every rank takes the same number of steps (DDP needs it); the epoch's draw is split between ranks.
    steps_per_epoch = max(1, cfg.samples_per_epoch // (cfg.batch_size * run.world_size))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.2
    )
    counts = np.bincount(fit.labels, minlength=len(AAMI_CLASSES)).astype(np.float64)
    cw = np.where(counts > 0, np.maximum(counts, 1.0) ** -cfg.class_weight_power, 0.0)
    cw = cw / (cw * counts).sum() * counts.sum()  # mean loss weight per beat = 1
    class_weight = torch.as_tensor(cw, dtype=torch.float32, device=run.device)
    p = sampling_weights(fit.labels, cfg.sampling_power)
    np_rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 10_000)
    beats_t = torch.from_numpy(np.ascontiguousarray(fit.beats, dtype=np.float32))
    rr_t = torch.from_numpy(np.ascontiguousarray(fit.rr, dtype=np.float32))
    labels_t = torch.from_numpy(fit.labels.astype(np.int64))

    epoch, best_score, best_epoch = 0, -1.0, -1
    best_state = copy.deepcopy(unwrap(net).state_dict())
    if resume is not None:
        unwrap(net).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"], np_rng, gen)
        epoch, best_score, best_epoch = resume["epoch"] + 1, resume["best_score"], resume["best_epoch"]
        best_state = resume["best_model"]
        log.info("member %d resumes at epoch %d (best %.4f at epoch %d)", k, epoch, best_score, best_epoch)

    def finished() -> bool:
        return epoch >= cfg.epochs or (epoch - best_epoch > cfg.patience and epoch >= cfg.min_epochs)

    bar = run.progress(cfg.epochs, f"classifier {k + 1}/{len(cfg.folds)}", initial=epoch)
    while not finished():
        t0 = time.monotonic()
        net.train()
        draw = np_rng.choice(len(p), size=steps_per_epoch * cfg.batch_size * run.world_size, p=p)
        if run.world_size > 1:
            draw = draw[run.shard(len(draw), np_rng)]
        total_loss, seen = 0.0, 0
        for i in range(steps_per_epoch):
            pick = torch.from_numpy(draw[i * cfg.batch_size : (i + 1) * cfg.batch_size])
            b, r, y = beats_t[pick], rr_t[pick], labels_t[pick]
            if cfg.augment:
                b, r = augment_batch(b, r, gen, cfg.warp)
            b, r, y = b.to(run.device), r.to(run.device), y.to(run.device)
            with run.autocast():
                logits = net(b, r)
            loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
        val_metrics = evaluate_classifier(net, val)
        score = macro_f1(val_metrics, cfg.val_classes)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(unwrap(net).state_dict())
        pc = val_metrics["per_class"]
        run.log(
            step, member=k, epoch=epoch, loss=total_loss / max(seen, 1), val_macro_f1=score,
            val_accuracy=val_metrics["accuracy"],
            **{f"val_f1_{c}": pc[c]["f1"] for c in AAMI_CLASSES if pc[c]["support"]},
            lr=sched.get_last_lr()[0], best_epoch=best_epoch, epoch_s=time.monotonic() - t0,
        )
        log.info("member %d epoch %d loss %.4f val macro F1 %.4f (S %.3f V %.3f) best %.4f@%d", k, epoch,
                 total_loss / max(seen, 1), score, pc["S"]["f1"] or 0.0, pc["V"]["f1"] or 0.0, best_score, best_epoch)
        epoch += 1
        run.save_checkpoint({
            "step": step, "member": k, "member_finished": finished(), "epoch": epoch - 1,
            "members_done": done + ([best_state] if finished() else []),
            "model": unwrap(net).state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "best_score": best_score, "best_epoch": best_epoch, "best_model": best_state,
            "rng": _rng_state(np_rng, gen), "config": cfg.to_dict(), "model_config": member.config,
        })
        step += 1
        bar.update(1)
    bar.close()
    return best_state, step


def load_classifier(checkpoint: str | Path) -> BeatClassifier:
    """The ensemble a run's checkpoint holds (before a run ends: the members it has finished)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    done = state["members_done"]
    if not done:
        raise ValueError(f"{checkpoint} holds no finished member yet")
    model = _ensemble(state["model_config"], done)
    if "logit_bias" in state:
        model.logit_bias.copy_(state["logit_bias"])
    if "validation" in state:
        model.validation = state["validation"]  # type: ignore[attr-defined]
    return model.eval()


# -- ONNX ---------------------------------------------------------------------------------------

#: Opset of the exported graph (the torch.export-based exporter's lowest native opset).
ONNX_OPSET = 18
#: Graph input and output names, in ``forward`` order.
ONNX_INPUTS = ("beats", "rr")
ONNX_OUTPUT = "logits"


def export_onnx(model: nn.Module, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis: beats [batch, 192], rr [batch, 3] -> logits.

    The graph only; the model contract (codec, classes, data hash) goes into ``metadata_props`` where
    models are published. Two warnings torch 2.13's exporter always raises for this graph are
    expected and silenced by exact message: the deprecation of ``LeafSpec`` inside torch itself, and
    the note that both inputs share the one ``batch`` axis (they do: that is the point).
    """
    import warnings

    net = unwrap(model).cpu().eval()
    example = (torch.zeros(2, BEAT_LENGTH), torch.full((2, 3), 0.8))
    batch = torch.export.Dim("batch")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
        torch.onnx.export(
            net, example, str(path), dynamo=True, input_names=list(ONNX_INPUTS), output_names=[ONNX_OUTPUT],
            opset_version=opset, dynamic_shapes={"beats": {0: batch}, "rr": {0: batch}}, verbose=False,
        )
    return path


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session, as the edge opens one (``threads`` intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_parity(model: nn.Module, path: str | Path, batch_sizes: Sequence[int] = (1, 37, 1024), seed: int = 0) -> float:
    """Largest |torch - onnxruntime| logit difference on random beats and RR at these batch sizes."""
    sess = onnx_session(path)
    rng = np.random.default_rng(seed)
    net = unwrap(model).cpu().eval()
    worst = 0.0
    for n in batch_sizes:
        beats = rng.normal(0.0, 0.3, (n, BEAT_LENGTH)).astype(np.float32)
        rr = rng.uniform(0.3, 1.6, (n, 3)).astype(np.float32)
        got = sess.run([ONNX_OUTPUT], {"beats": beats, "rr": rr})[0]
        with torch.no_grad():
            want = net(torch.from_numpy(beats), torch.from_numpy(rr)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def onnx_throughput(path: str | Path, data: BeatSet, batch_size: int, seconds: float = 3.0) -> float:
    """Beats per second through onnxruntime on one thread, feeding real beats ``batch_size`` at a time."""
    sess = onnx_session(path, threads=1)
    n = min(len(data), 4096) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"need at least {batch_size} beats")
    beats, rr = np.ascontiguousarray(data.beats[:n]), np.ascontiguousarray(data.rr[:n])
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, n, batch_size):
            sess.run([ONNX_OUTPUT], {"beats": beats[i : i + batch_size], "rr": rr[i : i + batch_size]})
            done += batch_size
    return done / (time.perf_counter() - t0)


# -- published inter-patient results ------------------------------------------------------------

#: Published DS1 -> DS2 results (percent). Sources, as checked:
#:  de Chazal, O'Dwyer & Reilly, IEEE TBME 51(7):1196-1206, 2004 (weighted linear discriminants) and
#:  Mar et al., IEEE TBME 58(8), 2011 (feature selection, weighted LD / MLP): both as tabulated in
#:  Garcia et al., "Inter-Patient ECG Heartbeat Classification with Temporal VCG Optimized by PSO",
#:  Sci. Rep. 7:10543 (2017), Table 2, which gives whole percents and no F figures (F left None).
#:  Zhang et al., "Heartbeat classification using disease-specific feature selection", Comput. Biol.
#:  Med. 46:79-89, 2014 (one-versus-one SVMs): the per-class figures could not be confirmed from a
#:  source available here, so they are left None rather than quoted from memory.
PUBLISHED: dict[str, dict[str, dict[str, float | None]]] = {
    "de Chazal et al. 2004": {
        "N": {"se": 87.0, "ppv": 99.0},
        "S": {"se": 76.0, "ppv": 38.0},
        "V": {"se": 77.0, "ppv": 82.0},
        "F": {"se": None, "ppv": None},
    },
    "Mar et al. 2011": {
        "N": {"se": 89.0, "ppv": 99.0},
        "S": {"se": 83.0, "ppv": 33.0},
        "V": {"se": 86.0, "ppv": 75.0},
        "F": {"se": None, "ppv": None},
    },
    "Zhang et al. 2014": {
        "N": {"se": None, "ppv": None},
        "S": {"se": None, "ppv": None},
        "V": {"se": None, "ppv": None},
        "F": {"se": None, "ppv": None},
    },
}

TABLE_CLASSES = ("N", "S", "V", "F")


def _f1(se: float | None, ppv: float | None) -> float | None:
    if se is None or ppv is None:
        return None
    return 0.0 if se + ppv == 0 else 2 * se * ppv / (se + ppv)


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def classification_table(
    metrics: Mapping[str, Any],
    published: Mapping[str, Mapping[str, Mapping[str, float | None]]] = PUBLISHED,
    name: str = "this classifier",
) -> str:
    """Markdown table: Se / +P / F1 (percent) for N, S, V, F, ours first, then the published rows.

    Published F1 is computed from the published Se and +P (rounded inputs give a rounded F1).
    """
    head = "| method | " + " | ".join(f"{c} Se | {c} +P | {c} F1" for c in TABLE_CLASSES) + " |"
    rule = "| --- |" + " ---: |" * (3 * len(TABLE_CLASSES))
    rows = [head, rule]

    def pct(v: float | None) -> float | None:
        return None if v is None else 100.0 * v

    ours = [name]
    for c in TABLE_CLASSES:
        pc = metrics["per_class"][c]
        ours += [_cell(pct(pc["se"])), _cell(pct(pc["ppv"])), _cell(pct(pc["f1"]))]
    rows.append("| " + " | ".join(ours) + " |")
    for method, per in published.items():
        cells = [method]
        for c in TABLE_CLASSES:
            se, ppv = per.get(c, {}).get("se"), per.get(c, {}).get("ppv")
            cells += [_cell(se), _cell(ppv), _cell(_f1(se, ppv))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- the experiment behind docs/classifier.md ---------------------------------------------------


def main_experiment(
    data_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
    cache_dir: str | Path | None = None,
    cfg: ClassifierConfig = ClassifierConfig(),
    threads: int | None = None,
) -> dict[str, Any]:
    """Train on DS1 (out-of-fold DS1 validation), measure once on DS2, export and time the ONNX model.

    Writes ``classifier.onnx``, ``report.json`` and ``table.md`` into a new run directory under
    ``runs_root/classifier`` and returns the report. ``threads`` sets torch's intra-op threads
    for training (default: torch's own choice).
    """
    import json

    from trainer.dataset import load_split

    if threads is not None:
        torch.set_num_threads(threads)
    ds1 = load_split("DS1", data_dir, cache_dir=cache_dir)
    ds2 = load_split("DS2", data_dir, cache_dir=cache_dir)
    run = Run.start(runs_root, "classifier", {"config": cfg.to_dict(), "data_hash_ds1": ds1.data_hash},
                    device="cpu", progress_bar=False)
    t0 = time.monotonic()
    model = fit_classifier(ds1, run, cfg)
    train_s = time.monotonic() - t0
    ds2_metrics = evaluate_classifier(model, ds2)
    onnx_path = export_onnx(model, run.dir / "classifier.onnx")
    report = {
        "config": cfg.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "train_seconds": round(train_s, 1),
        "logit_bias": [round(float(v), 3) for v in model.logit_bias],
        "ds1_out_of_fold": model.validation,  # type: ignore[attr-defined]
        "ds2": ds2_metrics,
        "onnx": {
            "path": str(onnx_path),
            "opset": ONNX_OPSET,
            "bytes": onnx_path.stat().st_size,
            "max_abs_diff_vs_torch": onnx_parity(model, onnx_path),
            "beats_per_s_1_thread": {str(b): round(onnx_throughput(onnx_path, ds2, b)) for b in (1, 16, 256)},
        },
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    table = classification_table(ds2_metrics, name="this classifier (DS2)")
    (run.dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run.dir / "table.md").write_text(table + "\n")
    run.log(0, phase="ds2", ds2_macro_f1=ds2_metrics["macro_f1"], train_seconds=train_s)
    log.info("DS2:\n%s", table)
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train and measure the AAMI beat classifier (DS1 -> DS2).")
    parser.add_argument("--data-dir", help="MIT-BIH directory (default $MITDB_DIR or ./data/mitdb)")
    parser.add_argument("--runs", default="runs", help="root of the run directories")
    parser.add_argument("--cache-dir", help="where to cache the encoded beat sets")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main_experiment(args.data_dir, args.runs, args.cache_dir, threads=args.threads)
