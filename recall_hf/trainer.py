"""`RecallTrainer` and its `RecallTrainingArguments` (the TRL way), and `run_task_sequence` for a list of tasks."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .callback import RecallCallback, check_merge_into
from .config import RecallConfig
from .privacy import TASK_CHECKPOINT_SUBDIR
from .report import MergeReport

logger = logging.getLogger(__name__)


def with_recall_config_fields(cls):
    """Add a `recall_<name>` field for every `RecallConfig` field (type, default, help and choices taken from it),
    so the trainer arguments cannot drift from `RecallConfig`. `recall_device` defaults to the training device."""
    for f in fields(RecallConfig):
        name = f"recall_{f.name}"
        metadata = {k: v for k, v in f.metadata.items() if k != "aliases"}  # `-k` is for the merge CLI only
        default, annotation = f.default, f.type
        if f.name == "device":
            default, annotation = None, "str | None"
            metadata["help"] = "Device for the merge's forward passes (default: the training device)."
        cls.__annotations__[name] = annotation
        setattr(cls, name, field(default=default, metadata=metadata))
    return cls


@dataclass
@with_recall_config_fields
class RecallTrainingArguments(TrainingArguments):
    r"""`TrainingArguments` plus the RECALL settings `RecallTrainer` hands to its `RecallCallback`.

    Parameters not listed here are those of [`~transformers.TrainingArguments`]; every `RecallConfig` field `x` is
    also an argument `recall_x` with the same default and help (`--recall_tau`, `--recall_fusion`, ...), except
    `recall_device`, which defaults to the training device. Sample selection is seeded by `recall_seed` (as in
    `RecallCallback`), not by the training `seed`.

    Args:
        recall_drop_dir (`str`, *optional*):
            Drop folder (watched by the daemon) that receives the task checkpoint when training ends.
        recall_merge_into (`str`, *optional*):
            Rolling merged model to fold the task checkpoint into right away (see `RecallCallback`).
        recall_task_name (`str`, *optional*):
            Task name for `recall.json`; defaults to `run_name`, else the name of `output_dir`.
        recall_output_subdir (`str`, *optional*, defaults to `"_recall_checkpoint"`):
            Folder inside `output_dir` that also receives the task checkpoint.
        recall_save_to_output_dir (`bool`, *optional*, defaults to `True`):
            Whether to write the task checkpoint into `output_dir/recall_output_subdir`.
        recall_text_field (`str`, *optional*):
            Train dataset column holding the texts (default: `messages`, `prompt`, `text` or `input_ids`).
    """

    recall_drop_dir: str | None = field(
        default=None, metadata={"help": "Drop folder that receives the task checkpoint when training ends."})
    recall_merge_into: str | None = field(
        default=None, metadata={"help": "Rolling merged model to fold the task checkpoint into right away."})
    recall_task_name: str | None = field(
        default=None, metadata={"help": "Task name for recall.json (default: run_name, else output_dir's name)."})
    recall_output_subdir: str = field(
        default=TASK_CHECKPOINT_SUBDIR, metadata={"help": "Folder inside output_dir that receives the checkpoint."})
    recall_save_to_output_dir: bool = field(
        default=True, metadata={"help": "Write the task checkpoint into output_dir/recall_output_subdir."})
    recall_text_field: str | None = field(
        default=None, metadata={"help": "Dataset column with the texts (default: messages, prompt, text, input_ids)."})

    def __post_init__(self):
        super().__post_init__()
        self.recall_config(device="cpu")  # validate the RECALL values now, not after training
        if self.recall_drop_dir is None and not self.recall_save_to_output_dir:
            raise ValueError("Set recall_drop_dir or keep recall_save_to_output_dir=True: the task checkpoint needs "
                             "somewhere to go.")

    def recall_config(self, device: str | None = None) -> RecallConfig:
        """The `RecallConfig` these arguments describe."""
        values = {f.name: getattr(self, f"recall_{f.name}") for f in fields(RecallConfig)}
        values["device"] = device or self.recall_device or str(self.device)
        values["max_candidates"] = max(values["max_candidates"], values["k"])
        return RecallConfig(**values)


class RecallTrainer(Trainer):
    """A `Trainer` that writes a RECALL task checkpoint (and optionally merges) when training ends.

    Takes the arguments of `transformers.Trainer`; `args` should be `RecallTrainingArguments`. Pass
    `recall_callback=RecallCallback(...)` instead to configure the callback directly.
    """

    def __init__(self, *args, recall_callback: RecallCallback | None = None, **kwargs):
        if len(args) < 2 and kwargs.get("args") is None:
            kwargs["args"] = RecallTrainingArguments(output_dir="trainer_output")
        super().__init__(*args, **kwargs)
        if recall_callback is None:
            if not isinstance(self.args, RecallTrainingArguments):
                raise TypeError(f"RecallTrainer got args of type {type(self.args).__name__}; pass "
                                "RecallTrainingArguments, or recall_callback=RecallCallback(...).")
            a = self.args
            recall_callback = RecallCallback(
                drop_dir=a.recall_drop_dir, config=a.recall_config(), task_name=a.recall_task_name,
                merge_into=a.recall_merge_into, output_subdir=a.recall_output_subdir,
                save_to_output_dir=a.recall_save_to_output_dir, text_field=a.recall_text_field,
                progress=not a.disable_tqdm,
            )
        recall_callback.trainer = self
        self.recall_callback = recall_callback
        self.add_callback(recall_callback)


@dataclass
class TaskStep:
    """One step of `run_task_sequence`: where training started, its task checkpoint, the merged model after it."""

    task: str
    init_model: Path
    checkpoint: Path | None
    drop_path: Path | None
    merged: Path | None
    report: MergeReport | None


def run_task_sequence(
    model_dir: str | Path,
    tasks: Mapping[str, Any] | Sequence[tuple[str, Any]],
    make_trainer: Callable[[Path, str, Any, Path], Trainer],
    workdir: str | Path,
    config: RecallConfig | None = None,
    chain: bool = True,
    drop_dir: str | Path | None = None,
    progress: bool = True,
) -> list[TaskStep]:
    """Train tasks one after the other; after each, write its task checkpoint and fold it into `workdir/merged`.

    Args:
        model_dir: the base model (or, for LoRA, whatever `make_trainer` needs to build the first trainer).
        tasks: `{name: train_data}` or `[(name, train_data), ...]`, in training order.
        make_trainer: `make_trainer(init_model_dir, task_name, train_data, output_dir) -> Trainer`; builds a
            trainer (any `Trainer`, e.g. TRL's `SFTTrainer`) that fine-tunes from `init_model_dir`. Any
            `RecallCallback` it adds is replaced by the one this function configures.
        workdir: holds `NN-<task>/` (each trainer's `output_dir`, task checkpoint inside) and `merged`.
        config: RECALL settings; defaults to `RecallConfig()`.
        chain: fine-tune task t from the merged model after task t-1 (`True`) or always from `model_dir`.
        drop_dir: also publish each task checkpoint to this drop folder.

    Returns:
        One `TaskStep` per task (on non-main processes the paths are `None`).
    """
    items = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)
    if not items:
        raise ValueError("run_task_sequence got no tasks.")
    names = [name for name, _ in items]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"Task names must be unique non-empty strings, got {names}.")
    model_dir, workdir = Path(model_dir), Path(workdir)
    merged = workdir / "merged"
    check_merge_into(merged)
    steps = []
    for i, (name, data) in enumerate(items, 1):
        init = merged.resolve() if chain and merged.is_symlink() else model_dir
        output_dir = workdir / f"{i:02d}-{name}"
        trainer = make_trainer(init, name, data, output_dir)
        while any(isinstance(cb, RecallCallback) for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(RecallCallback)
        callback = RecallCallback(drop_dir=drop_dir, config=config, task_name=name, merge_into=merged,
                                  parent=init, base=model_dir, trainer=trainer, progress=progress)
        trainer.add_callback(callback)
        logger.info("Task %d/%d %r: training from %s", i, len(items), name, init)
        trainer.train()
        steps.append(TaskStep(name, init, callback.checkpoint_dir, callback.drop_path, callback.merged_dir,
                              callback.report))
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return steps


__all__ = ["RecallTrainer", "RecallTrainingArguments", "TaskStep", "run_task_sequence"]
