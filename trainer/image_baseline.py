"""The seed paper's pipeline as a baseline: beat -> image -> image GAN -> image -> beat.

Piacentino, Guarner & Angulo ("Generating Synthetic ECGs Using GANs for Anonymizing Healthcare
Data", Electronics 2021, 10, 389) do not train a GAN on the signal. They transform the ECG into an
image, let a standard image GAN learn and generate images, and decode the generated images back
into signals; the paper's point is that the transform makes the mature image-GAN machinery
usable for health data, and it discusses the drawbacks of each step. This module reproduces that
pipeline on our canonical beats so that every figure of the product's generator has the seed
approach beside it, measured the same way.

The sources at hand gave the paper's abstract and introduction, not its method section, so the
rendering and decoding below are the plainest reading of "ECG as an image", not a transcription:

* **Beat to image** (``beats_to_images``): the beat is drawn as its trace, the way an ECG is
  plotted: a white line on a black 64 x 64 canvas, time on the horizontal axis (192 canonical
  samples -> 64 columns, 12 ms each) and amplitude on the vertical one (``amplitude_range``
  canonical units, R = 1, over 64 rows). Each column is inked over the vertical span that the
  polyline covers inside it, widened by ``line_halfwidth`` pixels with a linear fall-off (an
  anti-aliased pen), so steep QRS flanks stay connected.
* **Image GAN**: DCGAN (Radford et al. 2016), the standard convolutional image GAN:
  transposed-conv generator with batch norm and ReLU, tanh output; strided-conv discriminator
  with leaky ReLU; non-saturating BCE loss; Adam (2e-4, beta1 0.5).
* **Image to beat** (``images_to_beats``): per column, the intensity-weighted mean row of the ink
  (the centroid of the drawn line) gives the amplitude; columns without ink are interpolated from
  their neighbours; the 64 column values are interpolated back to 192 samples and the codec's
  baseline and amplitude rules are applied, so the output is a canonical beat like every other
  model's.

Deviations, each needed to measure the baseline on the product's terms: it is class-conditional
(one-hot class concatenated to the generator's noise and, as constant planes, to the
discriminator's input, as in conditional DCGANs) so it can be scored per AAMI class, with the
same class-focused sampling as the 1-D GAN so that rare classes are seen; it has no persona and
no RR input (the pipeline as described has neither); each canvas holds one beat in the codec's
window; and the networks are narrowed (16 base channels, DCGAN has 64) to fit a CPU budget of
about 8 minutes.
The round trip alone (encode, decode, no GAN) costs ``round_trip_error`` RMS, the floor under any
image-GAN surrogate of this kind (docs/generator.md gives the figure).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.codec import DEFAULT_SPEC
from edge.records import AAMI_CLASSES
from trainer.dataset import BeatSet
from trainer.generator import canonical
from trainer.runs import Run, seed_everything, unwrap

log = logging.getLogger(__name__)

#: Tag of the weights files :meth:`ImageBaseline.save` writes (trainer.tasks.IMAGE_BASELINE_WEIGHTS).
WEIGHTS_FORMAT = "ecg-image-baseline/1"


@dataclass(frozen=True)
class ImageBaselineConfig:
    """Image transform, DCGAN size and schedule (defaults: about 6 min on 2 CPU cores)."""

    image_size: int = 64  # canvas is image_size x image_size (DCGAN's native size)
    amplitude_range: float = 2.0  # rows span [-range, +range] canonical units (R = 1); beyond is clipped
    line_halfwidth: float = 1.0  # pen half-width, pixels (linear fall-off beyond the traced span)
    z_dim: int = 64  # generator noise
    ngf: int = 16  # generator base channels (DCGAN: 64)
    ndf: int = 16  # discriminator base channels (DCGAN: 64)
    batch_size: int = 64  # images per step
    steps: int = 2000  # generator steps (one discriminator step each, as in DCGAN)
    lr: float = 2e-4  # Adam learning rate, both networks (DCGAN)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas (DCGAN)
    class_probs: tuple[float, ...] = (0.4, 0.2, 0.2, 0.15, 0.05)  # class of each training image (N S V F Q)
    log_every: int = 100  # steps between metric lines
    checkpoint_every: int = 500  # steps between checkpoints
    seed: int = 0  # seeds torch and numpy

    def __post_init__(self) -> None:
        if self.image_size != 64:
            raise ValueError("the DCGAN layout here is built for 64 x 64 images")
        if len(self.class_probs) != len(AAMI_CLASSES) or not math.isclose(sum(self.class_probs), 1.0):
            raise ValueError("class_probs must give one probability per class summing to 1")


# ---------------------------------------------------------------------------------------------
# the transform and its inverse

def beats_to_images(beats: np.ndarray, cfg: ImageBaselineConfig = ImageBaselineConfig()) -> np.ndarray:
    """(n, 192) canonical beats -> (n, S, S) float32 images in [-1, 1] (ink +1, background -1)."""
    x = np.clip(np.asarray(beats, np.float32), -cfg.amplitude_range, cfg.amplitude_range)
    length = x.shape[1]
    s = cfg.image_size
    # polyline resampled at 4 points per column (both column edges included) -> span per column
    pos = np.linspace(0, length - 1, s * 4 + 1)
    trace = np.stack([np.interp(pos, np.arange(length), row) for row in x])  # (n, 4s+1)
    seg = np.stack([trace[:, 4 * j : 4 * j + 5] for j in range(s)], axis=1)  # (n, s, 5)
    lo, hi = _to_rows(seg.max(2), cfg), _to_rows(seg.min(2), cfg)  # top row = +range
    rows = np.arange(s, dtype=np.float32)[None, None, :]
    dist = np.maximum(lo[..., None] - rows, 0) + np.maximum(rows - hi[..., None], 0)
    ink = np.clip(1.0 - dist / (cfg.line_halfwidth + 0.5) + 0.5 / (cfg.line_halfwidth + 0.5), 0.0, 1.0)
    return (2.0 * ink.transpose(0, 2, 1) - 1.0).astype(np.float32)  # (n, rows, cols)


def _to_rows(values: np.ndarray, cfg: ImageBaselineConfig) -> np.ndarray:
    """Amplitude -> fractional row (row 0 at +range, row S-1 at -range)."""
    s = cfg.image_size
    return (cfg.amplitude_range - values) / (2 * cfg.amplitude_range) * (s - 1)


def images_to_beats(images: np.ndarray, cfg: ImageBaselineConfig = ImageBaselineConfig()) -> np.ndarray:
    """(n, S, S) images in [-1, 1] -> (n, 192) canonical beats (centroid of the ink per column)."""
    img = np.asarray(images, np.float32)
    s = img.shape[1]
    ink = np.clip((img + 1.0) / 2.0 - 0.1, 0.0, None)  # a little below-threshold haze is ignored
    rows = np.arange(s, dtype=np.float32)[None, :, None]
    mass = ink.sum(1)
    row = (ink * rows).sum(1) / np.maximum(mass, 1e-6)
    amp = cfg.amplitude_range - row / (s - 1) * (2 * cfg.amplitude_range)  # (n, s)
    cols = np.arange(s)
    empty = mass <= 1e-3
    for i in np.flatnonzero(empty.any(1)):  # columns the pen missed: bridge from their neighbours
        ok = ~empty[i]
        amp[i] = np.interp(cols, cols[ok], amp[i, ok]) if ok.sum() >= 2 else 0.0
    out = amp @ _column_to_sample(s, DEFAULT_SPEC.length).T
    return canonicalise(out)


@functools.cache
def _column_to_sample(columns: int, length: int) -> np.ndarray:
    """(length, columns) linear interpolation from column centres to canonical samples."""
    centres = (np.arange(columns) + 0.5) * (length - 1) / columns
    eye = np.eye(columns)
    return np.stack([np.interp(np.arange(length), centres, eye[j]) for j in range(columns)], axis=1).astype(np.float32)


def canonicalise(beats: np.ndarray) -> np.ndarray:
    """The codec's baseline and amplitude rules on decoded beats (the same rule the 1-D GAN applies)."""
    with torch.no_grad():
        return canonical(torch.from_numpy(np.ascontiguousarray(beats, np.float32))).numpy()


def round_trip_error(beats: np.ndarray, cfg: ImageBaselineConfig = ImageBaselineConfig()) -> float:
    """Median RMS error of decode(encode(beat)): what the transform alone loses."""
    back = images_to_beats(beats_to_images(beats, cfg), cfg)
    return float(np.median(np.sqrt(((back - canonicalise(np.asarray(beats, np.float32))) ** 2).mean(1))))


# ---------------------------------------------------------------------------------------------
# conditional DCGAN

class ImageGenerator(nn.Module):
    """DCGAN generator: (z, one-hot class) -> 64 x 64 image in [-1, 1]."""

    def __init__(self, cfg: ImageBaselineConfig) -> None:
        super().__init__()
        g = cfg.ngf
        self.z_dim = cfg.z_dim
        self.net = nn.Sequential(
            nn.ConvTranspose2d(cfg.z_dim + len(AAMI_CLASSES), 8 * g, 4, 1, 0, bias=False),
            nn.BatchNorm2d(8 * g), nn.ReLU(True),
            nn.ConvTranspose2d(8 * g, 4 * g, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * g), nn.ReLU(True),
            nn.ConvTranspose2d(4 * g, 2 * g, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * g), nn.ReLU(True),
            nn.ConvTranspose2d(2 * g, g, 4, 2, 1, bias=False), nn.BatchNorm2d(g), nn.ReLU(True),
            nn.ConvTranspose2d(g, 1, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(label, len(AAMI_CLASSES)).to(z.dtype)
        return self.net(torch.cat([z, onehot], 1)[:, :, None, None]).squeeze(1)


class ImageDiscriminator(nn.Module):
    """DCGAN discriminator with the class as constant input planes."""

    def __init__(self, cfg: ImageBaselineConfig) -> None:
        super().__init__()
        d = cfg.ndf
        self.net = nn.Sequential(
            nn.Conv2d(1 + len(AAMI_CLASSES), d, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
            nn.Conv2d(d, 2 * d, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * d), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * d, 4 * d, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * d), nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * d, 8 * d, 4, 2, 1, bias=False), nn.BatchNorm2d(8 * d), nn.LeakyReLU(0.2, True),
            nn.Conv2d(8 * d, 1, 4, 1, 0, bias=False),
        )

    def forward(self, images: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n, s, _ = images.shape
        onehot = F.one_hot(label, len(AAMI_CLASSES)).to(images.dtype)
        planes = onehot[:, :, None, None].expand(n, len(AAMI_CLASSES), s, s)
        return self.net(torch.cat([images[:, None], planes], 1)).flatten()


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ImageBaseline:
    """A trained image generator with the decoding step: samples canonical beats per class."""

    def __init__(self, generator: ImageGenerator, cfg: ImageBaselineConfig) -> None:
        self.generator, self.cfg = generator.cpu().eval(), cfg

    @torch.no_grad()
    def sample_images(self, labels: Sequence[int] | np.ndarray, rng: np.random.Generator | None = None,
                      batch_size: int = 1024) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        labels = np.asarray(labels, np.int64)
        out = np.empty((len(labels), self.cfg.image_size, self.cfg.image_size), np.float32)
        for i in range(0, len(labels), batch_size):
            lab = labels[i : i + batch_size]
            z = torch.from_numpy(rng.standard_normal((len(lab), self.cfg.z_dim)).astype(np.float32))
            out[i : i + batch_size] = self.generator(z, torch.from_numpy(lab)).numpy()
        return out

    def sample(self, labels: Sequence[int] | np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n, 192) canonical beats of the given classes."""
        return images_to_beats(self.sample_images(labels, rng), self.cfg)

    def save(self, path: str | Path) -> Path:
        """Write the generator's weights and config (tensors and plain values only, so
        :meth:`load` needs no pickled code): the evaluation's comparison row from a fresh clone."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": WEIGHTS_FORMAT, "config": asdict(self.cfg), "generator": self.generator.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ImageBaseline:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{path} is not an image-baseline weights file ({WEIGHTS_FORMAT})")
        cfg = ImageBaselineConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
        generator = ImageGenerator(cfg)
        generator.load_state_dict(saved["generator"])
        return cls(generator, cfg)


def fit_image_baseline(train: BeatSet, run: Run, cfg: ImageBaselineConfig = ImageBaselineConfig()) -> ImageBaseline:
    """Train the conditional DCGAN on images of ``train``'s beats (DS1); resumes from a checkpoint."""
    seed_everything(cfg.seed + run.rank)
    rng = np.random.default_rng(cfg.seed + 1000 * run.rank)
    device = run.device
    g_model, d_model = ImageGenerator(cfg), ImageDiscriminator(cfg)
    g_model.apply(_dcgan_init)
    d_model.apply(_dcgan_init)
    opt_g = torch.optim.Adam(g_model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(d_model.parameters(), lr=cfg.lr, betas=cfg.betas)
    step = 0
    state = run.load_checkpoint()
    if state is not None:
        g_model.load_state_dict(state["generator"])
        d_model.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step = int(state["step"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed image baseline training at step %d", step)
    generator, disc = run.wrap(g_model), run.wrap(d_model)
    images = torch.from_numpy(beats_to_images(train.beats, cfg))
    by_class = [np.flatnonzero(train.labels == c) for c in range(len(AAMI_CLASSES))]
    probs = np.asarray(cfg.class_probs) * np.array([len(i) > 0 for i in by_class])
    probs = probs / probs.sum()
    bce = nn.BCEWithLogitsLoss()

    def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.choice(len(AAMI_CLASSES), cfg.batch_size, p=probs)
        idx = np.array([rng.choice(by_class[c]) for c in labels])
        return images[idx].to(device), torch.from_numpy(labels).to(device)

    t0, acc, n_acc = time.monotonic(), {"d_loss": 0.0, "g_loss": 0.0}, 0
    bar = run.progress(cfg.steps, "image baseline", initial=step)
    ones = torch.ones(cfg.batch_size, device=device)
    zeros = torch.zeros(cfg.batch_size, device=device)
    while step < cfg.steps:
        real, label = real_batch()
        z = torch.randn(cfg.batch_size, cfg.z_dim, device=device)
        with run.autocast():
            fake = generator(z, label)
            d_loss = bce(disc(real, label), ones) + bce(disc(fake.detach(), label), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        with run.autocast():
            g_loss = bce(disc(fake, label), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        step += 1
        bar.update(1)
        acc["d_loss"] += d_loss.item()
        acc["g_loss"] += g_loss.item()
        n_acc += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = {k: v / n_acc for k, v in acc.items()}
            metrics["steps_per_s"] = n_acc / max(time.monotonic() - t0, 1e-9)
            run.log(step, **metrics)
            log.info("image baseline step %d %s", step, " ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
            t0, acc, n_acc = time.monotonic(), dict.fromkeys(acc, 0.0), 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint({
                "generator": unwrap(generator).state_dict(), "discriminator": unwrap(disc).state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step,
                "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "config": asdict(cfg),
            })
    bar.close()
    return ImageBaseline(copy.deepcopy(unwrap(generator)), cfg)


__all__ = [
    "ImageBaseline", "ImageBaselineConfig", "ImageDiscriminator", "ImageGenerator", "beats_to_images",
    "canonicalise", "fit_image_baseline", "images_to_beats", "round_trip_error",
]
