"""Where does the membership signal come from? The evaluation's attack (a beat scores higher
the closer its nearest generated beat; ``trainer.evaluate.membership_sample``) split by class
(DS1 members against DS2 non-members of the same class) and by training subject (each DS1
record's beats against DS2 beats), for the shipped generator and for the rhythm twin (DS1 class
means, nothing memorised), whose figures are what DS1 and DS2 being different people gives.

usage: membership_probe.py DATA_DIR DRAWS      (docs/generator.md, "Memorisation")"""
import sys

import numpy as np

from edge.anonymize import load_models
from edge.records import AAMI_CLASSES, DS1, DS2
from trainer.dataset import load_records
from trainer.evaluate import RhythmTwin, membership_sample
from trainer.privacy import auc, nearest_distance

data, draws = sys.argv[1], int(sys.argv[2])
gen, _ = load_models()
ds1, ds2 = load_records(DS1, data, ".cache/beats"), load_records(DS2, data, ".cache/beats")
c = gen.contract
for name, generate in (("product", gen.generate), ("twin", RhythmTwin.of(c, ds1).generate)):
    by_class: dict[str, list[float]] = {k: [] for k in ("all", *AAMI_CLASSES)}
    by_record: dict[str, list[float]] = {r: [] for r in DS1}
    for seed in range(draws):  # the evaluation's draws, with the distances kept
        mem, non, generated = membership_sample(generate, c.persona_dim, c.beat_dim, len(c.rr_features), ds1, ds2, seed)
        d_mem, d_non = nearest_distance(ds1.beats[mem], generated), nearest_distance(ds2.beats[non], generated)
        by_class["all"].append(auc(-d_mem, -d_non))
        for k, label in enumerate(AAMI_CLASSES):
            a, b = ds1.labels[mem] == k, ds2.labels[non] == k
            if a.sum() >= 20 and b.sum() >= 20:
                by_class[label].append(auc(-d_mem[a], -d_non[b]))
        for record in DS1:
            mine = ds1.record[mem] == record
            if mine.sum() >= 20:
                by_record[record].append(auc(-d_mem[mine], -d_non))
    print(f"{name}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in by_class.items() if v)
          + f"  (members per class in the last draw: {np.bincount(ds1.labels[mem], minlength=len(AAMI_CLASSES))})")
    ranked = sorted(((np.mean(v), r) for r, v in by_record.items() if v), reverse=True)
    print("  per training subject: " + " ".join(f"{r}:{a:.2f}" for a, r in ranked), flush=True)
