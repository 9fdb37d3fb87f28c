"""CPU cost per row of the shipped ONNX generator and classifier at a few batch sizes (one
thread; best of 7 repeats, so other load on the core inflates it least)."""
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

from edge.anonymize import load_models

gen, cls = load_models()
c = gen.contract
rng = np.random.default_rng(0)
for n in (1, 8, 64):
    p = rng.standard_normal((n, c.persona_dim)).astype(np.float32)
    z = rng.standard_normal((n, c.beat_dim)).astype(np.float32)
    lab = np.ones(n, np.int64)
    rr2 = np.full((n, len(c.rr_features)), 0.8, np.float32)
    rr3 = np.full((n, len(cls.contract.rr_features)), 0.8, np.float32)
    beats = gen.generate(p, z, lab, rr2)
    for name, f in (("generator", lambda: gen.generate(p, z, lab, rr2)), ("classifier", lambda: cls.logits(beats, rr3))):
        reps = max(3, 256 // n)
        best = np.inf
        for _ in range(7):
            t = time.process_time()
            for _ in range(reps):
                f()
            best = min(best, (time.process_time() - t) / reps / n)
        print(f"{name:10s} batch {n:3d}: {1e6 * best:5.0f} us/row", flush=True)
