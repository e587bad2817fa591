"""recall-hf: RECALL continual model merging for Hugging Face Trainer users (arXiv 2510.20479)."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import fold_adapter  # noqa: E402
from .config import RecallConfig  # noqa: E402
from .merge import MergeReport, recall_merge  # noqa: E402
from .samples import select_typical_samples  # noqa: E402

__all__ = ["fold_adapter", "MergeReport", "RecallConfig", "__version__", "recall_merge", "select_typical_samples"]


def __getattr__(name: str):
    # Trainer integration imports transformers' Trainer stack; load it only when asked for.
    if name in ("RecallCallback", "RecallTrainer", "RecallTrainingArguments", "run_task_sequence"):
        from . import callback, trainer

        return getattr(callback, name, None) or getattr(trainer, name)
    raise AttributeError(f"module 'recall_hf' has no attribute {name!r}")
