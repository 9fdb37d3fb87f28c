"""Where does re-identification of the anonymized stream come from? The evaluation's attacker
(1-NN over beat_features, enrolled on the real first half of each DS2 record) against the second
half anonymized DRAWS times per stream, each draw a session of its own with a fresh persona:
rank-1 per draw (mean and spread), per record, and with the attacker on the beat's shape alone
or its RR context alone.

Streams: ``product`` (shipped models), ``twin`` (one DS1 class-mean beat per class), ``product-pS``
(persona spread S), ``rate-free`` (the generator given each beat's prematurity at a fixed 75 bpm,
so its shape cannot follow the heart rate), ``rate-free-pS``, and ``rate-clipped`` (the
generator's local RR clipped to DS1's 5th-95th percentiles, 0.535-1.089 s, prematurity kept: only
rates rarer than DS1's leave their shape behind).

usage: reid_probe.py DATA_DIR DRAWS STREAM [STREAM ...]      (docs/identity.md)"""
import sys
import time

import numpy as np

from edge.anonymize import anonymize_signal, load_models
from edge.pipeline import Anonymizer, PipelineSettings
from edge.records import DS1, DS2, read_record
from trainer.dataset import load_records
from trainer.evaluate import RhythmTwin, attack_features
from trainer.privacy import FEATURE_VIEWS, NearestNeighbourAttacker


class RateFree:
    """The generator with every beat's RR context moved to 75 bpm, its prematurity kept."""

    def __init__(self, generator):
        self.generator, self.contract, self.sha256 = generator, generator.contract, generator.sha256

    def generate(self, persona, z, label, rr):
        rr = np.array(rr, dtype=np.float32)
        prematurity = rr[:, 0] / rr[:, 1]
        rr[:, 1] = 0.8
        rr[:, 0] = 0.8 * prematurity
        return self.generator.generate(persona, z, label, rr)


class RateClipped(RateFree):
    """The generator with every beat's local RR clipped to DS1's 5th-95th percentiles."""

    def generate(self, persona, z, label, rr):
        rr = np.array(rr, dtype=np.float32)
        scale = np.clip(rr[:, 1], 0.535, 1.089) / rr[:, 1]
        return self.generator.generate(persona, z, label, rr * scale[:, None])


data, draws, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
gen, cls = load_models()
twin = RhythmTwin.of(gen.contract, load_records(DS1, data, ".cache/beats"))


def stream(name: str):
    base, _, spread = name.partition("-p")
    settings = {"persona_spread": float(spread)} if spread else {}
    return {"product": gen, "twin": twin, "rate-free": RateFree(gen), "rate-clipped": RateClipped(gen)}[base], (
        {"persona_spread": 0.0} if base == "twin" else settings)


enrol, who, test = [], [], {n: [] for n in names}  # test: (features, subject, draw)
t0 = time.time()
for i, record in enumerate(DS2):
    rec = read_record(record, data, 0, sampto=None)
    n = min(len(rec.signal), round(600 * rec.fs))
    x, fs, half = rec.signal[:n], rec.fs, n // 2
    r = rec.beat_samples[rec.beat_samples < n]
    enrol.append(attack_features(x, r, fs)[r < half])
    who += [record] * int((r < half).sum())
    for name in names:
        generator, settings = stream(name)
        for draw in range(draws):
            anonymizer = Anonymizer(generator, cls, PipelineSettings(seed=i + 7919 * draw, **settings))
            out = anonymize_signal(x[half:], fs, anonymizer)
            test[name].append((attack_features(out.signal, out.beat_samples, fs), record, draw))
print(f"anonymized in {time.time() - t0:.0f} s")
enrolled, who = np.concatenate(enrol), np.array(who)
for view, cols in FEATURE_VIEWS.items():
    attacker = NearestNeighbourAttacker.enrol(enrolled[:, cols], who)
    for name in names:
        feats = np.concatenate([f for f, _, _ in test[name]])[:, cols]
        subject = np.concatenate([[s] * len(f) for f, s, _ in test[name]])
        draw = np.concatenate([[d] * len(f) for f, _, d in test[name]])
        guess = attacker.labels[attacker.distances(feats).argmin(axis=1)]
        per_draw = np.array([np.mean(guess[draw == d] == subject[draw == d]) for d in range(draws)])
        print(f"{view:6s} {name:14s} rank-1 {100 * per_draw.mean():5.1f} % (sd {100 * per_draw.std(ddof=1):.1f} "
              f"over {draws} draws, se {100 * per_draw.std(ddof=1) / np.sqrt(draws):.1f})")
        if view == "all":
            print("       per record: " + " ".join(f"{s}:{100 * np.mean(guess[subject == s] == s):.0f}" for s in DS2))
