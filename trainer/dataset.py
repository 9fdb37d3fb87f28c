"""Training beats: MIT-BIH beats cut with the shared codec, with AAMI labels and RR context.

Every model the edge runs sees beats exactly as the edge will produce them: canonical beats from
``edge.codec.encode`` around each reference R-peak, plus RR features the edge can compute causally
at the moment a beat is complete (the previous RR interval and running means of the ones before;
never the next RR interval, which would cost the edge a whole beat of latency).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.codec import DEFAULT_SPEC, CodecSpec, encode
from edge.records import AAMI_CLASSES, resolve_data_dir

log = logging.getLogger(__name__)

#: RR features, in this column order, all in seconds.
RR_FEATURES: tuple[str, ...] = ("pre_rr", "local_rr", "long_rr")
#: Beats the local and long running means of RR intervals run over (causal, this beat's pre-RR included).
LOCAL_BEATS = 10
LONG_BEATS = 300
#: Lead the trainer prefers; records without it use channel 0.
PREFERRED_LEAD = "MLII"


@dataclass
class BeatSet:
    """Canonical beats with labels and context, one row per beat."""

    beats: np.ndarray  # float32 (n, spec.length)
    labels: np.ndarray  # int64 (n,): index into AAMI_CLASSES
    rr: np.ndarray  # float32 (n, 3): RR_FEATURES in seconds
    record: np.ndarray  # str (n,): record name
    sample: np.ndarray  # int64 (n,): reference R-peak sample
    scale: np.ndarray  # float32 (n,): amplitude the codec divided by (mV)
    spec: CodecSpec = DEFAULT_SPEC
    data_hash: str = ""
    records: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> BeatSet:
        """Rows where ``mask`` is true (or the given indices)."""
        return BeatSet(
            self.beats[mask], self.labels[mask], self.rr[mask], self.record[mask], self.sample[mask],
            self.scale[mask], self.spec, self.data_hash, self.records,
        )

    def class_counts(self) -> dict[str, int]:
        return {c: int(np.count_nonzero(self.labels == i)) for i, c in enumerate(AAMI_CLASSES)}

    def save(self, path: str | os.PathLike[str]) -> None:
        np.savez_compressed(
            path, beats=self.beats, labels=self.labels, rr=self.rr, record=self.record, sample=self.sample,
            scale=self.scale, spec=json.dumps(self.spec.to_metadata()), data_hash=self.data_hash,
            records=np.array(self.records),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BeatSet:
        z = np.load(path, allow_pickle=False)
        return cls(
            z["beats"], z["labels"], z["rr"], z["record"], z["sample"], z["scale"],
            CodecSpec.from_metadata(json.loads(str(z["spec"]))), str(z["data_hash"]),
            tuple(str(r) for r in z["records"]),
        )


def rr_features(r_peaks: np.ndarray, fs: float) -> np.ndarray:
    """(n, 3) causal RR context of each beat: previous RR, mean of the last 10 and the last 300.

    The first beat has no previous RR; it borrows the next one (its only neighbour), as does a
    stream's first beat at the edge, which uses a default until it has one.
    """
    r = np.asarray(r_peaks, dtype=np.float64)
    n = r.size
    out = np.zeros((n, 3), dtype=np.float32)
    if n < 2:
        out[:] = 0.8
        return out
    pre = np.diff(r, prepend=np.nan) / fs
    pre[0] = pre[1]
    csum = np.concatenate([[0.0], np.cumsum(pre)])
    idx = np.arange(n)
    for col, width in ((1, LOCAL_BEATS), (2, LONG_BEATS)):
        lo = np.maximum(0, idx + 1 - width)
        out[:, col] = (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)
    out[:, 0] = pre
    return out


def record_files_hash(names: Sequence[str], data_dir: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    for name in sorted(names):
        for suffix in (".hea", ".dat", ".atr"):
            h.update(name.encode() + suffix.encode())
            h.update((data_dir / f"{name}{suffix}").read_bytes())
    return h


def build_beatset(
    records: Sequence[str],
    data_dir: str | os.PathLike[str] | None = None,
    spec: CodecSpec = DEFAULT_SPEC,
) -> BeatSet:
    """Encode every AAMI-labelled reference beat of ``records`` (MLII lead where present).

    Beats whose codec window runs past the record's ends are dropped, as are beats whose symbol has
    no AAMI class ('B', 'r', '?' ...), though those still count as neighbours for RR intervals.
    ``data_hash`` fingerprints the exact record files and codec spec the set came from.
    """
    import wfdb

    from edge.records import read_record

    root = resolve_data_dir(data_dir)
    parts: list[BeatSet] = []
    for name in records:
        header = wfdb.rdheader(str(root / name))
        channel = header.sig_name.index(PREFERRED_LEAD) if PREFERRED_LEAD in header.sig_name else 0
        rec = read_record(name, root, channel)
        rr = rr_features(rec.beat_samples, rec.fs)
        classes = rec.aami_classes
        keep = classes != ""
        enc = encode(rec.signal, rec.beat_samples[keep], rec.fs, spec)
        ok = ~enc.padded
        labels = np.array([AAMI_CLASSES.index(c) for c in classes[keep]], dtype=np.int64)
        parts.append(
            BeatSet(
                enc.beats[ok], labels[ok], rr[keep][ok], np.full(int(ok.sum()), name),
                rec.beat_samples[keep][ok], enc.scale[ok].astype(np.float32), spec,
            )
        )
        log.debug("%s: %d beats (lead %s)", name, int(ok.sum()), rec.lead)
    h = record_files_hash(records, root)
    h.update(json.dumps(spec.to_metadata(), sort_keys=True).encode())
    return BeatSet(
        np.concatenate([p.beats for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.rr for p in parts]),
        np.concatenate([p.record for p in parts]),
        np.concatenate([p.sample for p in parts]),
        np.concatenate([p.scale for p in parts]),
        spec,
        h.hexdigest(),
        tuple(records),
    )


def load_records(
    records: Sequence[str],
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    spec: CodecSpec = DEFAULT_SPEC,
) -> BeatSet:
    """A BeatSet of ``records``, cached as .npz under ``cache_dir`` keyed by the records' bytes
    and the codec spec (so a changed file or codec never reads a stale cache)."""
    if cache_dir is None:
        return build_beatset(records, data_dir, spec)
    root = resolve_data_dir(data_dir)
    key = record_files_hash(records, root)
    key.update(json.dumps(spec.to_metadata(), sort_keys=True).encode())
    path = Path(cache_dir) / f"beats-{key.hexdigest()[:20]}.npz"
    if path.is_file():
        return BeatSet.load(path)
    beats = build_beatset(records, root, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    beats.save(path)
    return beats


def load_split(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    spec: CodecSpec = DEFAULT_SPEC,
) -> BeatSet:
    """DS1 (train and tune) or DS2 (measure) as a BeatSet."""
    from edge.records import DS1, DS2

    return load_records({"DS1": DS1, "DS2": DS2}[split], data_dir, cache_dir, spec)
