"""Checks `RecallCallback` runs in `on_train_begin`: everything it needs after training, checked before step 1.

A task checkpoint is written when training ends, hours later. Whatever would make that fail (no texts column, no
tokenizer, an unwritable drop folder or output_dir) is found here and reported as one error listing every problem,
before the first optimizer step. With `save_strategy="no"` the Trainer never creates `output_dir`, so it is
created and probed here too: the task checkpoint is the only thing the run leaves behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from .texts import dataset_texts, text_tokenizer

PREFLIGHT_ROWS = 8  # rows rendered as a dry run of the text extraction at train end


def probe_writable(directory: Path) -> str | None:
    """Create `directory` and a file in it; the problem as a sentence, or `None` when it can be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".recall-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"{directory} is not writable ({err.strerror or err})"
    return None


def texts_problem(dataset, tokenizer, text_field: str | None) -> str | None:
    """Dry run of the train-end text extraction on a few rows; the problem as a sentence, or `None`."""
    if dataset is None:
        return "the trainer has no train dataset to take the task's texts from"
    try:
        texts = dataset_texts(dataset, text_tokenizer(tokenizer), text_field, max_rows=PREFLIGHT_ROWS)
    except (ValueError, KeyError, TypeError) as err:
        return str(err).rstrip(".")
    if not texts:
        return f"the first {PREFLIGHT_ROWS} rows of the train dataset hold no non-empty texts"
    return None


def destinations(callback, args) -> list[Path]:
    """Folders the callback writes into at train end: the drop folder, `output_dir`, the merged model's parent."""
    out = [callback.drop_dir] if callback.drop_dir is not None else []
    if callback.save_to_output_dir:
        out.append(Path(args.output_dir))
    if callback.merge_into is not None:
        out.append(Path(callback.merge_into).absolute().parent)
    return out


def preflight_problems(callback, args, dataset, tokenizer) -> list[str]:
    """Every reason the callback would fail at train end, as sentences (empty when it can run)."""
    problems = []
    if tokenizer is None:
        problems.append("no tokenizer: pass processing_class=TOKENIZER to the Trainer (it renders and embeds the "
                        "task's texts)")
    else:
        problem = texts_problem(dataset, tokenizer, callback.text_field)
        if problem:
            problems.append(problem)
    for directory in destinations(callback, args):
        problem = probe_writable(directory)
        if problem:
            problems.append(problem)
    return problems


def check_before_training(callback, args, dataset, tokenizer) -> None:
    """Raise one `ValueError` naming every problem `preflight_problems` finds."""
    problems = preflight_problems(callback, args, dataset, tokenizer)
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise ValueError(f"RecallCallback checked before training what it needs when training ends: {listed}. "
                         "Nothing was trained.")


def train_inputs(trainer, kwargs: dict) -> tuple:
    """`(train dataset, tokenizer)` as the callback will find them at train end (see `RecallCallback`)."""
    tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
    if tokenizer is None and trainer is not None:
        tokenizer = trainer.processing_class
    dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
    loader = kwargs.get("train_dataloader")
    if dataset is None and loader is not None:
        dataset = loader.dataset
    return dataset, tokenizer
