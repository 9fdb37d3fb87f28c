"""What `ecg-trainer fit` can train, and how each trained model becomes an ONNX model for the edge.

One entry per trainable thing: its config class, its fit function, and (for models the edge runs)
the contract its export carries. Imports are lazy so `ecg-trainer --help` does not load torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.models import CLASSIFIER, GENERATOR

#: The trained image baseline the evaluation compares against by default (``ecg-trainer export``
#: of an image-baseline run writes it): the seed paper's approach, without training it first.
IMAGE_BASELINE_WEIGHTS = Path(__file__).parent / "assets" / "image-baseline.pt"

#: RR context each model kind takes (columns of trainer.dataset.BeatSet.rr, in order).
CLASSIFIER_RR = ("pre_rr", "local_rr", "long_rr")
GENERATOR_RR = ("pre_rr", "local_rr")


@dataclass(frozen=True)
class Task:
    name: str
    module: str  # trainer module holding the code
    config: str  # config dataclass name in that module
    fit: str  # fit function name: fit(train: BeatSet, run: Run, cfg) -> nn.Module
    kind: str | None  # model kind in the edge's contract; None: not exported to the edge
    rr_features: tuple[str, ...] = ()
    #: torch CPU threads when ``fit`` is given none; None: torch's choice (the machine's cores).
    #: A fixed count makes a CPU run repeat bit for bit on any machine.
    threads: int | None = None

    def load(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    def config_class(self) -> type:
        return self.load(self.config)

    def fit_function(self) -> Callable[..., Any]:
        return self.load(self.fit)


TASKS: dict[str, Task] = {
    # The classifier's small convolutions gain little from a second thread; one thread makes the
    # shipped classifier reproducible wherever it is trained.
    "classifier": Task("classifier", "trainer.classifier", "ClassifierConfig", "fit_classifier", CLASSIFIER, CLASSIFIER_RR,
                       threads=1),
    "generator": Task("generator", "trainer.generator", "GeneratorConfig", "fit_generator", GENERATOR, GENERATOR_RR),
    "image-baseline": Task("image-baseline", "trainer.image_baseline", "ImageBaselineConfig", "fit_image_baseline", None),
}


def resolve_config(task: Task, overrides: list[str], seed: int | None = None) -> Any:
    """The task's default config with ``key=value`` overrides applied (values parsed by field type)."""
    cls = task.config_class()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"{task.name} config has no field {key!r}; fields: {', '.join(fields)}")
        changes[key] = _parse_value(text, hints[key], key)
    if seed is not None and "seed" in fields:
        changes["seed"] = seed
    return dataclasses.replace(cls(), **changes)


def _parse_value(text: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(text)
            return text.lower() in {"true", "1", "yes"}
        if hint in (int, float, str):
            return hint(text)
        if origin in (tuple, list):
            value = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
            args = [a for a in typing.get_args(hint) if a is not Ellipsis]
            item = args[0] if args else str
            return tuple(item(v) if item in (int, float, str) else v for v in value)
        return json.loads(text)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ValueError(f"cannot read {key}={text!r} as {getattr(hint, '__name__', hint)}") from None
