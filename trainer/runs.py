"""Training runs: a numbered directory per run, resolved options, a JSONL metrics log, checkpoints,
device and mixed-precision choice, and DistributedDataParallel under ``torchrun``.

Model code (classifier, generator) stays free of this plumbing: it receives a :class:`Run` and
calls ``run.wrap``, ``run.autocast``, ``run.log``, ``run.progress`` and the checkpoint methods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` takes CUDA when there is one; asking for ``cuda`` without one is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if requested not in {"cpu", "cuda"}:
        raise ValueError(f"--device must be auto, cpu or cuda, not {requested!r}")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def next_run_dir(root: str | os.PathLike[str], kind: str) -> Path:
    """``root/kind/NNN`` with the next free number (stylegan2-ada's numbered run directories)."""
    base = Path(root) / kind
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    path = base / f"{max(taken, default=0) + 1:03d}"
    path.mkdir()
    return path


@dataclass
class Run:
    """One training run's directory, device and distributed context."""

    dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False  # mixed precision (CUDA only)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    progress_bar: bool = True
    _t0: float = field(default_factory=time.monotonic)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @classmethod
    def start(
        cls,
        root: str | os.PathLike[str],
        kind: str,
        options: dict[str, Any],
        device: str = "auto",
        resume: str | os.PathLike[str] | None = None,
        progress_bar: bool = True,
    ) -> Run:
        """Create (or, with ``resume``, reopen) a run directory and the distributed context.

        Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here: NCCL on
        CUDA, gloo on CPU; rank 0 makes the directory and tells the others its name.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = choose_device(device)
        if world > 1:
            import torch.distributed as dist

            if dev.type == "cuda":
                torch.cuda.set_device(local_rank)
                dev = torch.device("cuda", local_rank)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if resume is not None:
            path = Path(resume)
            if not (path / "options.json").is_file():
                raise FileNotFoundError(f"{path} is not a run directory (no options.json)")
        elif rank == 0:
            path = next_run_dir(root, kind)
        else:
            path = Path()
        if world > 1:
            import torch.distributed as dist

            box = [str(path)]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0])
        run = cls(path, dev, amp=dev.type == "cuda", rank=rank, world_size=world,
                  local_rank=local_rank, progress_bar=progress_bar)
        if run.is_main and resume is None:
            resolved = {**options, "device": str(dev), "world_size": world, "amp": run.amp,
                        "torch": torch.__version__}
            (path / "options.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
        log.info("run %s on %s (world size %d)", path, dev, world)
        return run

    # -- model plumbing -------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """Move to the device; wrap in DistributedDataParallel when several processes train."""
        module = module.to(self.device)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        return module

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast on CUDA when mixed precision is on; a no-op on CPU."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def shard(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """This rank's share of a shuffled index of ``n`` items (all ranks must pass equal rngs)."""
        order = rng.permutation(n)
        return order[self.rank :: self.world_size]

    # -- records --------------------------------------------------------------------------------
    def log(self, step: int, **metrics: float) -> None:
        """Append one JSON line of metrics (rank 0 only)."""
        if not self.is_main:
            return
        row = {"step": step, "time_s": round(time.monotonic() - self._t0, 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()})
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def progress(self, total: int, desc: str, initial: int = 0) -> Any:
        """A tqdm bar on rank 0 (silent elsewhere, or when bars are off)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, initial=initial, disable=not (self.is_main and self.progress_bar),
                    dynamic_ncols=True, leave=False)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write atomically (rank 0): a killed run resumes from the last whole checkpoint."""
        if not self.is_main:
            return
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (for export and checkpoints)."""
    return module.module if hasattr(module, "module") else module


def batches(index: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(index), batch_size):
        yield index[i : i + batch_size]
