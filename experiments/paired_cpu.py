"""CPU of the edge pipeline at a git revision against the working tree, measured in pairs.

On a shared core two runs of the same code in a row can differ by 30 %, so timing one version after
the other says nothing about a change worth 5 %. Here both versions run in one process, on the
same simulated wearables (``edge.bench.Wearables``, staggered) and the fixed clock, tick by tick,
taking turns at going first; each one's thread CPU time is summed over the measured ticks, so a
slow spell of the core falls on both. The revision's ``edge`` package is copied out of git under
another name (``edge_base``) so that both import side by side.

It also hashes every output frame and beat of both: a change meant to keep the output prints
``same output True``. The same code against itself reads about 0.99.

    PYTHONPATH=. python experiments/paired_cpu.py REV [STREAMS] [SECONDS] [SEED]
    (defaults: 1000 streams, 10 s measured after the bench's warm-up, seed 0; pin it with taskset)
"""

import hashlib
import importlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from edge.bench import WARM_UP_S, Wearables  # noqa: E402

BASE = "edge_base"
_IMPORT = re.compile(r"\b(from|import) edge(\.| import)|\"edge\.")


def copy_revision(rev: str, into: Path) -> None:
    """``edge/`` at ``rev`` as the package ``edge_base`` under ``into``."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "edge"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "edge").rename(into / BASE)
    for path in (into / BASE).rglob("*.py"):
        text = _IMPORT.sub(lambda m: m.group(0).replace("edge", BASE, 1), path.read_text())
        path.write_text(text)


class Version:
    """One version's pipeline, its CPU time and a hash of its output."""

    def __init__(self, package: str, seed: int) -> None:
        mod = {name: importlib.import_module(f"{package}.{name}")
               for name in ("anonymize", "frames", "metrics", "pipeline")}
        self.name = package
        self.frame = mod["frames"].Frame
        generator, classifier = mod["anonymize"].load_models()
        self.anonymizer = mod["pipeline"].Anonymizer(generator, classifier, mod["pipeline"].PipelineSettings(seed=seed),
                                                     mod["metrics"].EdgeMetrics())
        self.cpu = 0.0
        self.beats = 0
        self.hash = hashlib.sha256()

    def tick(self, arrived: list, fs: float, clock: float, measured: bool) -> None:
        frames = [(self.frame(device, x, fs, seq=seq), at) for device, x, seq, at in arrived]
        t = time.thread_time()
        for frame, at in frames:
            self.anonymizer.feed(frame, now=at)
        out = self.anonymizer.step(now=clock)
        if measured:
            self.cpu += time.thread_time() - t
            self.beats += len(out.beats)
        for f in out.frames:
            self.hash.update(f.samples.tobytes())
            self.hash.update(str(f.start).encode())
        for b in out.beats:
            self.hash.update(f"{b.sample},{b.label}".encode())


def main() -> None:
    rev = sys.argv[1]
    streams = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        copy_revision(rev, Path(tmp))
        sys.path.insert(0, tmp)
        from edge.cli import bundled_record
        from edge.config import PipelineConfig
        from edge.replay import read_wfdb
        from edge.service import tune_collector

        versions = [Version(BASE, seed), Version("edge", seed)]
        signal, fs, _ = read_wfdb(bundled_record())
        tune_collector()
        wearables = Wearables(streams, signal, fs, 100, seed)
        tick = PipelineConfig().tick_s
        clock, k = tick, 0
        while clock <= WARM_UP_S + seconds:
            arrived = wearables.arrived(clock)
            for v in versions if k % 2 == 0 else versions[::-1]:
                v.tick(arrived, fs, clock, clock >= WARM_UP_S)
            clock += tick
            k += 1
    base, new = versions
    print(f"{streams} streams, {seconds:g} s, seed {seed}: CPU {rev} {base.cpu:.2f} s, working tree {new.cpu:.2f} s, "
          f"ratio {new.cpu / base.cpu:.3f}; beats {base.beats} / {new.beats}; "
          f"same output {base.hash.hexdigest() == new.hash.hexdigest()}")


if __name__ == "__main__":
    main()
