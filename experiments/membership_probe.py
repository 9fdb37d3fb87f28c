"""Where does the membership signal come from? The evaluation's attack (a beat scores higher
the closer its nearest generated beat; ``trainer.evaluate.generator_membership``) split by class
(DS1 members against DS2 non-members of the same class) and by training subject (each DS1
record's beats against DS2 beats), for the shipped generator and for the rhythm twin (DS1 class
means, nothing memorised), whose figures are what DS1 and DS2 being different people gives.

usage: membership_probe.py DATA_DIR DRAWS      (docs/generator.md, "Memorisation")"""
import sys

import numpy as np

from edge.anonymize import load_models
from edge.records import AAMI_CLASSES, DS1, DS2
from trainer.dataset import load_records
from trainer.evaluate import RhythmTwin
from trainer.privacy import auc, nearest_distance

data, draws = sys.argv[1], int(sys.argv[2])
gen, _ = load_models()
ds1, ds2 = load_records(DS1, data, ".cache/beats"), load_records(DS2, data, ".cache/beats")
c = gen.contract
n = 4000
for name, generate in (("product", gen.generate), ("twin", RhythmTwin.of(c, ds1).generate)):
    by_class: dict[str, list[float]] = {k: [] for k in ("all", *AAMI_CLASSES)}
    by_record: dict[str, list[float]] = {r: [] for r in DS1}
    for seed in range(draws):  # the draws of generator_membership, with the distances kept
        rng = np.random.default_rng(seed)
        mem = rng.choice(len(ds1.beats), n, replace=False)
        non = rng.choice(len(ds2.beats), n, replace=False)
        pick = rng.choice(len(ds1.beats), 3 * n, replace=False)
        persona = np.repeat(rng.standard_normal((3 * n // 8 + 1, c.persona_dim)), 8, axis=0)[: 3 * n].astype(np.float32)
        z = rng.standard_normal((3 * n, c.beat_dim)).astype(np.float32)
        generated = np.concatenate([generate(persona[lo : lo + 512], z[lo : lo + 512], ds1.labels[pick][lo : lo + 512],
                                             ds1.rr[pick][lo : lo + 512, : len(c.rr_features)])
                                    for lo in range(0, 3 * n, 512)])
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
