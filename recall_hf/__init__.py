"""recall-hf: RECALL continual model merging for Hugging Face Trainer users (arXiv 2510.20479).

The public names are loaded on first use, so `import recall_hf` (and `recall-hf --help`) stays fast: torch,
transformers and the Trainer stack are imported only by the modules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import RecallConfig  # noqa: E402  (stdlib only)

# Public name -> the module that defines it.
_LAZY = {
    "MergePlan": "plan",
    "MergeReport": "report",
    "execute_merge": "merge",
    "fold_adapter": "lora.fold",
    "merge_coefficients": "plan",
    "prepare_merge": "merge",
    "recall_merge": "merge",
    "represent": "plan",
    "select_typical_samples": "samples",
    "RecallCallback": "callback",
    "RecallTrainer": "trainer",
    "RecallTrainingArguments": "trainer",
    "run_task_sequence": "trainer",
}

__all__ = ["RecallConfig", "__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'recall_hf' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
