"""`RecallCallback`: when a task's training ends, pick its typical samples and write a task checkpoint (SPEC 1, 3).

Works with any `transformers.Trainer` (TRL's `SFTTrainer` included), for full fine-tuning and PEFT LoRA adapters:

```python
trainer = Trainer(model, args, train_dataset=ds, processing_class=tok,
                  callbacks=[RecallCallback(drop_dir="/srv/recall/drop")])
trainer.train()  # -> /srv/recall/drop/<task>-<timestamp>/ with READY, and <output_dir>/_recall_checkpoint/
```

Where the callback gets what it needs at `on_train_end`:
- the trainer: `trainer=` if given (`RecallTrainer` passes itself), else the `Trainer` whose method fired the event,
  found in the calling frames (`find_trainer`). With it, results are logged through `trainer.log`, so every
  reporting integration (TensorBoard, W&B, ...) receives them exactly like TRL's callbacks that hold their trainer;
  the texts come from `trainer.train_dataset` (before unused columns are dropped); FSDP / DeepSpeed ZeRO-3 weights
  are gathered with `trainer.accelerator.get_state_dict`. Without a trainer, results go to `state.log_history` and
  the `logging` logger, and the texts come from the train dataloader's dataset.
- the model and tokenizer: the event's `model` and `processing_class` (`tokenizer` on older versions).

Only the main process writes and merges; every process waits for it before `train()` returns, so a script can use
the checkpoint or merged model right after training on any rank.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .card import publish_task_checkpoint
from .config import RecallConfig
from .durable import fsync_dir
from .fingerprint import FingerprintConfig
from .modeldir import READY, is_adapter_dir, read_recall_json
from .preflight import check_before_training, train_inputs
from .privacy import TASK_CHECKPOINT_SUBDIR
from .samples import select_typical_samples
from .task_checkpoint import staged_task_dir, unique_drop_path, write_task_checkpoint
from .texts import dataset_texts, render_prompt, text_tokenizer
from .versions import VersionedDir

logger = logging.getLogger(__name__)

VERSIONS_SUFFIX = ".versions"


# ---- The rolling merged model ---------------------------------------------------------------------------------------


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() or is_adapter_dir(path)


def check_merge_into(merge_into: str | Path) -> None:
    """`merge_into` must be absent, an empty directory, or a symlink to a model (what `fold_into` maintains)."""
    path = Path(merge_into)
    if path.is_symlink():
        if not path.exists() or not _holds_model(path.resolve()):
            raise ValueError(f"merge_into={path} is a symlink to {os.readlink(path)}, which holds no model.")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"merge_into={path} is an existing non-empty directory or file. Pass a new path (the first "
                         "task checkpoint becomes the merged model), or to start from an existing model make "
                         f"{path} a symlink to it (`ln -s MODEL_DIR {path}`); it is never modified.")


def _link_or_copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (same filesystem; files are never modified in place) or copy `src`'s files into `dst`."""
    for p in sorted(src.iterdir()):
        if p.name in skip or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
            continue
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)


def fold_into(merge_into: str | Path, checkpoint: str | Path, config: RecallConfig | None = None,
              progress: bool = False):
    """Fold a task checkpoint into the rolling merged model at `merge_into`, switching it atomically.

    `merge_into` is a symlink to `<merge_into>.versions/vNNNN`. With no model there yet, the checkpoint becomes
    the merged model; otherwise `recall_merge([current, checkpoint])` writes the next version. The symlink is then
    replaced in one `rename`, and older versions inside `<merge_into>.versions` are removed (a model the symlink
    pointed to elsewhere is left alone).

    Returns:
        `(version_dir, MergeReport | None)`.
    """
    from .merge import recall_merge

    merge_into, checkpoint = Path(merge_into).absolute(), Path(checkpoint)
    check_merge_into(merge_into)
    current = merge_into.resolve() if merge_into.is_symlink() else None
    versions = VersionedDir(merge_into.with_name(merge_into.name + VERSIONS_SUFFIX), merge_into, first=1)
    versions.root.mkdir(parents=True, exist_ok=True)
    new = versions.path(versions.next_name())
    if current is None:
        with staged_task_dir(new) as stage:
            _link_or_copy_tree(checkpoint, stage, skip={READY})
            publish_task_checkpoint(stage)  # samples to _recall_private/, a model card
        (new / READY).unlink()  # a model version, not a drop
        report = None
    else:
        report = recall_merge([current, checkpoint], None, new, config, progress=progress)
    if merge_into.is_dir() and not merge_into.is_symlink():
        merge_into.rmdir()  # empty (checked above)
    versions.switch(new.name)
    versions.prune(keep={new.name})
    logger.info("Merged model %s -> %s (%s)", merge_into, new, "merged" if report else "first task")
    return new, report


# ---- The callback ---------------------------------------------------------------------------------------------------


def find_trainer(max_depth: int = 16):
    """The `transformers.Trainer` whose method is running further up the call stack (the one firing the event)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


def is_sharded(trainer) -> bool:
    """Whether no single process holds the whole model (FSDP or DeepSpeed ZeRO-3)."""
    if trainer is None:
        return False
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        ds = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        return getattr(ds, "zero_stage", None) == 3
    return False


def wait_for_everyone(trainer) -> None:
    if trainer is not None:
        trainer.accelerator.wait_for_everyone()
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unwrap(model, trainer=None):
    if trainer is not None:
        return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    while hasattr(model, "module") and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class RecallCallback(TrainerCallback):
    """Writes a RECALL task checkpoint when training ends, optionally folding it into a merged model.

    Args:
        drop_dir (`str`, *optional*):
            Drop folder (the daemon's); the checkpoint lands in `<drop_dir>/<task>-<UTC timestamp>/`, `READY` last.
        config (`RecallConfig`, *optional*):
            RECALL settings for sample selection and merging; defaults to `RecallConfig()`.
        task_name (`str`, *optional*):
            Task name for `recall.json`; defaults to `args.run_name`, else the name of `args.output_dir`.
        merge_into (`str`, *optional*):
            A rolling merged model (a symlink `fold_into` maintains) to fold the checkpoint into right away.
        output_subdir (`str`, *optional*, defaults to `"_recall_checkpoint"`):
            Also write the checkpoint to `<args.output_dir>/<output_subdir>` (replacing an earlier one). The leading
            `_` keeps it (and its typical samples, training text) out of `Trainer.push_to_hub` uploads.
        save_to_output_dir (`bool`, *optional*, defaults to `True`):
            Whether to write that copy. The two copies share files via hard links when possible.
        text_field (`str`, *optional*):
            Dataset column holding the texts; by default `messages`, `prompt`, `text` or `input_ids`.
        parent (`str`, *optional*):
            The model training started from, for `recall.json` (default: the path the model was loaded from).
        base (`str`, *optional*):
            The original base model, for `recall.json` (default: the parent's recorded base, else the parent).
        trainer (`transformers.Trainer`, *optional*):
            The trainer, for logging through `trainer.log`; found from the call stack when not given.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars for embedding and merging.

    After training, `checkpoint_dir`, `drop_path`, `merged_dir` (the new merged version) and `report` (the
    `MergeReport`, when a merge ran) hold the results on the main process.
    """

    def __init__(
        self,
        drop_dir: str | Path | None = None,
        config: RecallConfig | None = None,
        task_name: str | None = None,
        merge_into: str | Path | None = None,
        output_subdir: str = TASK_CHECKPOINT_SUBDIR,
        save_to_output_dir: bool = True,
        text_field: str | None = None,
        parent: str | Path | None = None,
        base: str | Path | None = None,
        trainer=None,
        progress: bool = True,
    ):
        if drop_dir is None and not save_to_output_dir:
            raise ValueError("RecallCallback has nowhere to write the task checkpoint: pass drop_dir=DIR or keep "
                             "save_to_output_dir=True.")
        if save_to_output_dir and (not output_subdir or Path(output_subdir).is_absolute() or ".." in output_subdir):
            raise ValueError(f"output_subdir must be a relative folder name inside output_dir, got {output_subdir!r}.")
        if merge_into is not None:
            check_merge_into(merge_into)
        self.drop_dir = Path(drop_dir) if drop_dir is not None else None
        self.config = config or RecallConfig()
        self.task_name = task_name
        self.merge_into = Path(merge_into) if merge_into is not None else None
        self.output_subdir = output_subdir
        self.save_to_output_dir = save_to_output_dir
        self.text_field = text_field
        self.parent = parent
        self.base = base
        self.trainer = trainer
        self.progress = progress
        self._found_trainer = None
        self.checkpoint_dir: Path | None = None
        self.drop_path: Path | None = None
        self.merged_dir: Path | None = None
        self.report = None

    # -- events --

    def on_train_begin(self, args, state, control, **kwargs):
        # Fail before hours of training, not after: destinations are checked now.
        self._found_trainer = self.trainer or find_trainer()
        if state.is_world_process_zero:
            out = self._output_checkpoint_dir(args)
            if out is not None and out.exists() and read_recall_json(out).get("kind") != "task-checkpoint":
                raise ValueError(f"{out} exists and is not a RECALL task checkpoint; choose another output_subdir.")
            if self.merge_into is not None:
                check_merge_into(self.merge_into)
            # Texts, tokenizer, writable destinations (drop folder, output_dir even with save_strategy="no").
            check_before_training(self, args, *train_inputs(self._found_trainer, kwargs))

    def on_train_end(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        trainer = self.trainer or self._found_trainer or find_trainer()
        processing_class = processing_class or kwargs.get("tokenizer")
        if processing_class is None and trainer is not None:
            processing_class = trainer.processing_class
        if processing_class is None:
            raise RuntimeError("RecallCallback needs the tokenizer: pass processing_class=TOKENIZER to the Trainer.")
        main = state.is_world_process_zero
        try:
            samples = state_dict = None
            if is_sharded(trainer):
                # Every rank holds a shard: all join the forward passes and the state-dict gather.
                samples = self._select(trainer.train_dataset, trainer.model_wrapped, processing_class, main)
                state_dict = trainer.accelerator.get_state_dict(
                    trainer.deepspeed if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model)
            if main:
                self._write_and_merge(args, state, trainer, unwrap(model if model is not None else trainer.model,
                                                                   trainer), processing_class, train_dataloader,
                                      samples, state_dict)
        finally:
            wait_for_everyone(trainer)
        return control

    # -- work --

    def _output_checkpoint_dir(self, args) -> Path | None:
        return Path(args.output_dir) / self.output_subdir if self.save_to_output_dir else None

    def _task_name(self, args) -> str:
        if self.task_name:
            return self.task_name
        if args.run_name and args.run_name != args.output_dir:
            return str(args.run_name)
        return Path(args.output_dir).name or "task"

    def _select(self, dataset, model, processing_class, show: bool) -> list[dict]:
        tok = text_tokenizer(processing_class)
        texts = dataset_texts(dataset, tok, self.text_field, 2 * self.config.max_candidates, self.config.seed)
        if not texts:
            raise ValueError("The train dataset yielded no non-empty texts to pick typical samples from.")
        return select_typical_samples(texts, model, tok, self.config, progress=self.progress and show)

    def _write_and_merge(self, args, state, trainer, model, processing_class, train_dataloader, samples,
                         state_dict) -> None:
        t0 = time.perf_counter()
        if samples is None:
            dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
            if dataset is None and train_dataloader is not None:
                dataset = train_dataloader.dataset
            samples = self._select(dataset, model, processing_class, True)
        task = self._task_name(args)
        logs: dict[str, Any] = {"recall/num_samples": float(len(samples))}
        write = dict(tokenizer=processing_class, samples=samples, task_name=task, parent=self.parent,
                     base=self.base, state_dict=state_dict,
                     fingerprint_config=FingerprintConfig(steps=self.config.fingerprint_steps),
                     extra={"global_step": state.global_step, "output_dir": str(Path(args.output_dir).absolute())})
        out = self._output_checkpoint_dir(args)
        if self.drop_dir is not None:
            self.drop_path = unique_drop_path(self.drop_dir, task)
        if out is None:
            # Merge from a hidden work copy and publish it to the drop folder last, so the daemon can never take
            # the drop away while the merge still reads it.
            out = self.drop_path.with_name(f".{self.drop_path.name}.work-{os.getpid()}")
        old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
        if old is not None:
            os.rename(out, old)  # the earlier run's checkpoint, kept until the new one is complete
        try:
            self.checkpoint_dir = write_task_checkpoint(model, out_dir=out, **write)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logs["recall/checkpoint_seconds"] = time.perf_counter() - t0
        try:
            if self.merge_into is not None:
                t1 = time.perf_counter()
                self.merged_dir, self.report = fold_into(self.merge_into, self.checkpoint_dir, self.config,
                                                         self.progress)
                logs["recall/merge_seconds"] = time.perf_counter() - t1
                logs["recall/task_count"] = float(read_recall_json(self.merged_dir).get("task_count", 1))
                if self.report is not None:
                    for layer, w in enumerate(self.report.newest_weight):
                        logs[f"recall/newest_weight/layer_{layer:02d}"] = w
        finally:  # a failed local merge must not keep the checkpoint from the drop folder
            if self.drop_path is not None:
                self._publish_drop()
        self._log(trainer, state, logs)
        logger.info("RECALL task %r: checkpoint %s%s%s", task, self.checkpoint_dir,
                    f", drop {self.drop_path}" if self.drop_path else "",
                    f", merged {self.merged_dir}" if self.merged_dir else "")

    def _publish_drop(self) -> None:
        if self.save_to_output_dir:
            with staged_task_dir(self.drop_path) as stage:
                _link_or_copy_tree(self.checkpoint_dir, stage, skip={READY})
        else:
            os.rename(self.checkpoint_dir, self.drop_path)  # complete, READY included
            fsync_dir(self.drop_path.parent)
            self.checkpoint_dir = self.drop_path

    def _log(self, trainer, state, logs: dict[str, float]) -> None:
        """Through `trainer.log` (reaches every reporting integration) when the trainer is known."""
        if trainer is not None:
            trainer.log(dict(logs))
        else:
            state.log_history.append({**logs, "step": state.global_step})


__all__ = ["RecallCallback", "dataset_texts", "fold_into", "render_prompt"]
