"""File mode: a WFDB record through the same streaming pipeline as live, written as a WFDB record.

The input is cut into wearable-sized frames and fed exactly as a live stream would be; the output
record has one channel at the input's rate and length in mV (masked samples are WFDB's invalid
value), and an annotation file with one beat label (N, S, V, F or Q) per emitted surrogate at its
R-peak sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge import models
from edge.metrics import EdgeMetrics
from edge.pipeline import Anonymizer, PipelineSettings, StepOutput
from edge.replay import frames, read_wfdb
from edge.sinks import ADC_GAIN

log = logging.getLogger(__name__)



@dataclass
class AnonymizedRecord:
    """The output of file mode, in memory."""

    signal: np.ndarray  # float64 mV, same length as the input; NaN where masked
    fs: float
    beat_samples: np.ndarray  # int64 R-peak samples of the emitted surrogates
    beat_labels: list[str]  # their AAMI classes
    latency: list[float] = field(default_factory=list)  # added latency per beat, stream seconds
    models: dict[str, str] = field(default_factory=dict)

    @property
    def masked_fraction(self) -> float:
        return float(np.isnan(self.signal).mean()) if len(self.signal) else 0.0


def load_models(generator: str | Path | None = None, classifier: str | Path | None = None
                ) -> tuple[models.GeneratorSession, models.ClassifierSession]:
    """The given models, or the ones shipped in the package, checked against the edge's contract."""
    gen = Path(generator) if generator else models.default_model_path(models.GENERATOR)
    cls = Path(classifier) if classifier else models.default_model_path(models.CLASSIFIER)
    for path, kind in ((gen, "generator"), (cls, "classifier")):
        if not path.is_file():
            raise FileNotFoundError(f"{kind} model {path} not found (train one: ecg-trainer defaults)")
    return models.GeneratorSession(gen), models.ClassifierSession(cls)


def anonymize_signal(signal_mv: np.ndarray, fs: float, anonymizer: Anonymizer, frame_s: float = 0.25,
                     device: str = "file") -> AnonymizedRecord:
    """Stream one signal through ``anonymizer`` (stream time as the clock) and collect the output."""
    out = StepOutput()
    end_s = 0.0
    for frame in frames(device, signal_mv, fs, frame_s):
        end_s = (frame.seq + len(frame.samples)) / fs
        out.extend(anonymizer.feed(frame, now=end_s))
        step = anonymizer.step(now=end_s)
        out.extend(step)
    out.extend(anonymizer.end(device, "end of input", now=end_s))
    signal = np.full(len(signal_mv), np.nan)
    for f in out.frames:
        signal[f.start : f.start + len(f.samples)] = f.samples
    return AnonymizedRecord(
        signal=signal,
        fs=fs,
        beat_samples=np.array([b.sample for b in out.beats], dtype=np.int64),
        beat_labels=[b.label for b in out.beats],
        models=anonymizer.models(),
    )


def anonymize_record(
    input_record: str | Path,
    output_record: str | Path,
    channel: int = 0,
    generator: str | Path | None = None,
    classifier: str | Path | None = None,
    seed: int | None = None,
    frame_s: float = 0.25,
    settings: PipelineSettings | None = None,
) -> AnonymizedRecord:
    """``ecg-edge anonymize``: read, stream through the pipeline, write OUTPUT.hea/.dat/.atr."""
    signal, fs, _ = read_wfdb(input_record, channel)
    gen, cls = load_models(generator, classifier)
    settings = settings or PipelineSettings()
    if seed is not None:
        settings.seed = seed
    anonymizer = Anonymizer(gen, cls, settings, EdgeMetrics())
    result = anonymize_signal(signal, fs, anonymizer, frame_s)
    write_record(output_record, result)
    log.info("wrote %s: %d samples at %g Hz, %d beats, %.2f%% masked", output_record, len(result.signal), fs,
             len(result.beat_samples), 100 * result.masked_fraction)
    return result


def write_record(output_record: str | Path, result: AnonymizedRecord) -> None:
    """WFDB .hea/.dat (one channel, mV, 16-bit, 1 µV resolution) and .atr (beat labels)."""
    import wfdb

    out = Path(output_record)
    out.parent.mkdir(parents=True, exist_ok=True)
    clipped = np.clip(result.signal, -32.0, 32.0)
    comments = ["anonymized ECG: every sample synthetic (surrogate beats and synthetic baseline)",
                "masked samples (fail closed) are WFDB invalid samples"]
    comments += [f"{kind} model version {version}" for kind, version in sorted(result.models.items())]
    wfdb.wrsamp(
        out.name, fs=result.fs, units=["mV"], sig_name=["ECG"], p_signal=clipped[:, None], fmt=["16"],
        adc_gain=[ADC_GAIN], baseline=[0], comments=comments, write_dir=str(out.parent),
    )
    if len(result.beat_samples):
        wfdb.wrann(out.name, "atr", result.beat_samples, symbol=list(result.beat_labels), write_dir=str(out.parent))
    else:  # an empty annotation file still says "no beats"
        wfdb.wrann(out.name, "atr", np.array([0]), symbol=["~"], write_dir=str(out.parent))
