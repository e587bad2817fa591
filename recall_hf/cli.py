"""`recall-hf` command line: merge, select-samples, fold, task-checkpoint, and the daemon's commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .config import RecallConfig
from .flags import add_dataclass_args, dataclass_values

# The RecallConfig fields `select-samples` uses (the rest only matter to a merge).
SELECT_FIELDS = ("k", "max_candidates", "minibatch_threshold", "seed", "batch_size", "max_length", "device",
                 "device_map")
TASK_CHECKPOINT_FIELDS = (*SELECT_FIELDS, "fingerprint_steps")
PLUGIN_GROUP = "recall_hf.commands"


def _config_from(args: argparse.Namespace, only=None) -> RecallConfig:
    return RecallConfig(**dataclass_values(args, RecallConfig, only))


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import recall_merge
    from .plan import parse_task_counts

    counts = parse_task_counts(args.task_counts) if args.task_counts else None
    config = _config_from(args)
    report = recall_merge(args.models, args.probes, args.out, config, task_counts=counts, base=args.base)
    newest = report.newest_weight
    print(
        f"Merged {len(report.models)} models into {args.out} ({report.kind}); newest model's weight per layer: "
        f"{min(newest):.3f}..{max(newest):.3f}; carries {report.output_task_count} tasks."
    )
    if report.calibration:
        chosen = report.calibration["chosen"]
        print(f"Calibrated fold ({report.calibration['protocol']}): chose {chosen['name']} of "
              f"{len(report.calibration['candidates'])} candidates on {len(report.calibration['tasks'])} tasks.")
    print(f"Report: {Path(args.out) / 'recall_report.json'}  plot: {Path(args.out) / 'recall_weights.png'}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .samples import SAMPLES_NAME, read_texts, select_typical_samples, write_samples

    config = _config_from(args, SELECT_FIELDS)
    samples = select_typical_samples(read_texts(args.texts), args.model, config=config)
    out = Path(args.out) if args.out else Path(args.model) / SAMPLES_NAME
    write_samples(out, samples)
    print(f"Wrote {len(samples)} typical samples to {out}")
    return 0


def _cmd_fold(args: argparse.Namespace) -> int:
    from .lora.fold import fold_adapter

    out = fold_adapter(args.adapter, args.out, base=args.base)
    print(f"Folded adapter {args.adapter} into full weights at {out}")
    return 0


def _cmd_task_checkpoint(args: argparse.Namespace) -> int:
    from .task_checkpoint import make_task_checkpoint

    config = _config_from(args, TASK_CHECKPOINT_FIELDS)
    out = make_task_checkpoint(args.model_dir, args.texts, task=args.task, parent=args.parent, base=args.base,
                               config=config, overwrite=args.overwrite)
    print(f"Made {out} a task checkpoint (recall_samples.jsonl, recall_fingerprint.safetensors, recall.json, READY)")
    return 0


def _add_task_checkpoint(sub) -> None:
    t = sub.add_parser(
        "task-checkpoint",
        help="turn a fine-tuned model or LoRA adapter folder into a task checkpoint in place",
        description="Pick the typical samples of TEXTS, record the model's fingerprint on them (SPEC 2.7) and write "
        "recall_samples.jsonl, recall_fingerprint.safetensors, recall.json and READY into MODEL_DIR. The weights "
        "are not touched. Needed by `merge --calibrate` for the newest model.",
    )
    t.add_argument("model_dir", help="the fine-tuned model (config.json + weights) or PEFT adapter folder")
    t.add_argument("--texts", required=True, help='the task\'s texts: a .jsonl of {"text": ...} lines or a .txt')
    t.add_argument("--task", default=None, help="the task's name (default: the folder's name)")
    t.add_argument("--parent", default=None, help="the model fine-tuning started from (the deployed model, or the "
                   "base)")
    t.add_argument("--base", default=None, help="the original base model (an adapter's base must be local)")
    t.add_argument("--overwrite", action="store_true", help="redo a folder that already is a task checkpoint")
    add_dataclass_args(t.add_argument_group("RECALL settings (RecallConfig)"), RecallConfig, TASK_CHECKPOINT_FIELDS)
    t.set_defaults(func=_cmd_task_checkpoint)


def _add_merge(sub) -> None:
    m = sub.add_parser(
        "merge",
        help="merge model (or LoRA adapter) directories with RECALL",
        description="Merge models with RECALL. The newest model is the LAST one. Full models: "
        "directories with config.json + safetensors. Adapters: PEFT adapter directories.",
    )
    m.add_argument("models", nargs="+", help="model or adapter directories, oldest first, newest last")
    m.add_argument("--out", required=True, help="output directory (must not exist; written atomically)")
    m.add_argument("--probes", default=None, help='jsonl of {"text": ...} (or .txt); more than k texts are reduced '
                   "to typical samples. Default: recall_samples.jsonl of the newest model")
    m.add_argument("--task-counts", default=None,
                   help="comma-separated tasks each model carries (default: from each recall.json, else 1)")
    m.add_argument("--base", default=None, help="base model dir: for adapter merges (default: from "
                   "adapter_config.json), --fusion task_vector and --calibrate's from-base form")
    add_dataclass_args(m.add_argument_group("RECALL settings (RecallConfig)"), RecallConfig)
    m.set_defaults(func=_cmd_merge)


def _add_select_samples(sub) -> None:
    s = sub.add_parser(
        "select-samples",
        help="write recall_samples.jsonl (typical samples) for a model",
        description="Embed texts with a fine-tuned model, cluster them (KMeans), and keep the text "
        "nearest each centroid.",
    )
    s.add_argument("texts", help='a .jsonl of {"text": ...} lines or a .txt with one text per line')
    s.add_argument("--model", required=True, help="the fine-tuned model directory")
    s.add_argument("--out", default=None, help="output jsonl (default: MODEL/recall_samples.jsonl)")
    add_dataclass_args(s.add_argument_group("RECALL settings (RecallConfig)"), RecallConfig, SELECT_FIELDS)
    s.set_defaults(func=_cmd_select)


def _add_fold(sub) -> None:
    f = sub.add_parser(
        "fold",
        help="fold a (merged) LoRA adapter into full model weights",
        description="Write base + adapter as a plain model directory (PEFT merge_and_unload, fp32 "
        "accumulation, cast back to the base dtype), atomically.",
    )
    f.add_argument("adapter", help="PEFT adapter directory")
    f.add_argument("--out", required=True, help="output model directory (must not exist)")
    f.add_argument("--base", default=None, help="base model dir (default: base_model_name_or_path of the adapter)")
    f.set_defaults(func=_cmd_fold)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recall-hf",
        description="RECALL continual merging for Hugging Face models (arXiv 2510.20479): typical samples, "
        "per-layer representation similarity, per-layer softmax weights, streaming layer-wise fusion.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge(sub)
    _add_select_samples(sub)
    _add_fold(sub)
    _add_task_checkpoint(sub)
    add_plugin_commands(sub)
    return parser


def _broken_plugin(name: str, target: str, err: BaseException):
    def run(args: argparse.Namespace) -> int:
        raise RuntimeError(f"the {name!r} commands ({target}) failed to import: {type(err).__name__}: {err}; "
                           "reinstall recall-hf (pip install -e .) or fix that import (-v shows the traceback).")

    return run


def add_plugin_commands(sub) -> None:
    """Commands other packages register under the `recall_hf.commands` entry-point group (the daemon's), so this
    package never imports them by name. A plugin that fails to import is reported on stderr and keeps a command
    that fails with the reason, instead of silently disappearing."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            add_commands = ep.load()
        except Exception as err:  # noqa: BLE001 - any import error of a plugin must be reported, not raised here
            print(f"recall-hf: warning: commands {ep.name!r} from {ep.value} failed to import: {err}", file=sys.stderr)
            # Takes any arguments (no option prefix) so that running it reaches the error, not a usage message.
            broken = sub.add_parser(ep.name, help=f"(unavailable: {ep.value} failed to import)", add_help=False,
                                    prefix_chars="\x00")
            broken.add_argument("rest", nargs="*")
            broken.set_defaults(func=_broken_plugin(ep.name, ep.value, err))
            continue
        add_commands(sub)


def run_parsed(args: argparse.Namespace, prog: str) -> int:
    """Run a parsed subcommand: bad input becomes a one-line error and exit code 2 (`-v` shows the traceback)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as err:
        if args.verbose:
            raise
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv), "recall-hf")


if __name__ == "__main__":
    sys.exit(main())
