"""Cut the small MIT-BIH slices under tests/data (and the one bundled in edge/assets) from a full copy of the database.

Run once by hand (python tests/data/make_slices.py DATA_DIR); the slices are committed so the test
suite runs on a fresh clone without the database. Digital samples, gains and annotations are copied
unchanged; only the span is cut.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import wfdb

#: record -> (start second, seconds): chosen for what each exercises.
SLICES = {
    "100": (0, 120),  # clean normal sinus rhythm with a few APCs
    "119": (0, 120),  # ventricular bigeminy and trigeminy
    "208": (60, 120),  # PVCs, fusion beats, couplets
    "232": (0, 120),  # sinus bradycardia, APCs, long pauses
    "105": (120, 120),  # heavy noise and baseline wander
}


#: The record bundled inside the edge package (channel MLII only) for `ecg-edge detect` and the demo.
BUNDLED = ("208", 0, 300, Path(__file__).parents[2] / "edge" / "assets")


def main(data_dir: str) -> None:
    out = Path(__file__).parent
    jobs = [(name, start_s, seconds, out, None) for name, (start_s, seconds) in SLICES.items()]
    jobs.append((*BUNDLED, [0]))
    for name, start_s, seconds, out, channels in jobs:
        header = wfdb.rdheader(str(Path(data_dir) / name))
        fs = int(header.fs)
        sampfrom, sampto = start_s * fs, (start_s + seconds) * fs
        rec = wfdb.rdrecord(str(Path(data_dir) / name), sampfrom=sampfrom, sampto=sampto,
                            channels=channels, physical=False)
        ann = wfdb.rdann(str(Path(data_dir) / name), "atr", sampfrom=sampfrom, sampto=sampto, shift_samps=True)
        wfdb.wrsamp(
            name,
            fs=rec.fs,
            units=rec.units,
            sig_name=rec.sig_name,
            d_signal=rec.d_signal,
            fmt=rec.fmt,
            adc_gain=rec.adc_gain,
            baseline=rec.baseline,
            comments=[f"slice of MIT-BIH record {name}, samples {sampfrom}-{sampto}"] + rec.comments,
            write_dir=str(out),
        )
        keep = ann.chan == 0 if channels else slice(None)
        wfdb.wrann(name, "atr", ann.sample[keep], list(np.asarray(ann.symbol)[keep]),
                   subtype=ann.subtype[keep], chan=ann.chan[keep],
                   num=ann.num[keep], aux_note=list(np.asarray(ann.aux_note)[keep]), write_dir=str(out))
        print(name, rec.sig_len, "samples,", len(ann.sample), "annotations")


if __name__ == "__main__":
    main(sys.argv[1])
