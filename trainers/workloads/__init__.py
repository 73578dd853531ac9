"""Workloads by name, imported on first use so a vision trial never loads transformers."""

from __future__ import annotations

import importlib

from trainers.workloads.base import Workload

WORKLOAD_CLASSES = {
    "lm": "trainers.workloads.lm:LanguageModelWorkload",
    "vision": "trainers.workloads.vision:VisionWorkload",
}


def get_workload_class(name: str) -> type[Workload]:
    if name not in WORKLOAD_CLASSES:
        raise ValueError(
            f"Unknown workload {name!r}; choose one of {sorted(WORKLOAD_CLASSES)}"
        )
    module_name, class_name = WORKLOAD_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
