"""`recall-hf` command line: merge, select-samples, and the daemon's commands."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from .config import RecallConfig


def _add_config_args(p: argparse.ArgumentParser) -> None:
    defaults = RecallConfig()
    p.add_argument("--tau", type=float, default=defaults.tau, help=f"softmax temperature (default {defaults.tau})")
    p.add_argument(
        "--similarity",
        default=defaults.similarity,
        help=f"per-layer similarity: rbf, linear_cka, rbf_cka, cosine (default {defaults.similarity})",
    )
    p.add_argument(
        "--mode",
        default=defaults.mode,
        choices=["continual", "multi"],
        help="continual: target is the newest (last) model; multi: uniform target",
    )
    p.add_argument(
        "--no-task-count-prior",
        dest="task_count_prior",
        action="store_false",
        help="do not add log(task count) of each model to the softmax logits",
    )
    p.add_argument("--normalize-depth", action="store_true", help="rescale layer divergences by their spread")
    p.add_argument(
        "--fusion",
        default=defaults.fusion,
        choices=["convex", "task_vector"],
        help="convex: sum_k w_k theta_k (default, the paper); task_vector: base + sum_k c_k task vectors "
        "(for task models each fine-tuned from one base; needs --base for full models)",
    )
    p.add_argument("-k", "--k", type=int, default=defaults.k, help=f"typical samples per task (default {defaults.k})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling and clustering")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="forward-pass batch size")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="token limit per probe text")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="output dtype (default: keep the stored dtype)",
    )
    p.add_argument("--device", default=defaults.device, help="device for forward passes (default cpu)")
    p.add_argument("--device-map", default=None, help="accelerate device_map for large models, e.g. auto")


def _config_from(args: argparse.Namespace, **extra) -> RecallConfig:
    names = {f.name for f in fields(RecallConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return RecallConfig(**values)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import recall_merge

    counts = [int(c) for c in args.task_counts.split(",")] if args.task_counts else None
    config = _config_from(args, max_rank=args.max_rank)
    report = recall_merge(args.models, args.probes, args.out, config, task_counts=counts, base=args.base)
    newest = report.newest_weight
    print(
        f"Merged {len(report.models)} models into {args.out} ({report.kind}); newest model's weight per layer: "
        f"{min(newest):.3f}..{max(newest):.3f}; carries {report.output_task_count} tasks."
    )
    print(f"Report: {Path(args.out) / 'recall_report.json'}  plot: {Path(args.out) / 'recall_weights.png'}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .samples import SAMPLES_NAME, read_texts, select_typical_samples, write_samples

    config = _config_from(args)
    samples = select_typical_samples(read_texts(args.texts), args.model, config=config)
    out = Path(args.out) if args.out else Path(args.model) / SAMPLES_NAME
    write_samples(out, samples)
    print(f"Wrote {len(samples)} typical samples to {out}")
    return 0


def _cmd_fold(args: argparse.Namespace) -> int:
    from .adapters import fold_adapter

    out = fold_adapter(args.adapter, args.out, base=args.base)
    print(f"Folded adapter {args.adapter} into full weights at {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recall-hf",
        description="RECALL continual merging for Hugging Face models (arXiv 2510.20479): typical samples, "
        "per-layer representation similarity, per-layer softmax weights, streaming layer-wise fusion.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge model (or LoRA adapter) directories with RECALL",
        description="Merge models with RECALL. The newest model is the LAST one. Full models: "
        "directories with config.json + safetensors. Adapters: PEFT adapter directories.",
    )
    m.add_argument("models", nargs="+", help="model or adapter directories, oldest first, newest last")
    m.add_argument("--out", required=True, help="output directory (must not exist; written atomically)")
    m.add_argument(
        "--probes",
        default=None,
        help='jsonl of {"text": ...} (or .txt); more than k texts are reduced to typical samples. '
        "Default: recall_samples.jsonl of the newest model",
    )
    m.add_argument(
        "--task-counts",
        default=None,
        help="comma-separated tasks each model carries (default: from each recall.json, else 1)",
    )
    m.add_argument(
        "--base",
        default=None,
        help="base model dir: for adapter merges (default: from adapter_config.json) and --fusion task_vector",
    )
    m.add_argument("--max-rank", type=int, default=None, help="adapter merges: compress merged LoRA to this rank")
    _add_config_args(m)
    m.set_defaults(func=_cmd_merge)

    s = sub.add_parser(
        "select-samples",
        help="write recall_samples.jsonl (typical samples) for a model",
        description="Embed texts with a fine-tuned model, cluster them (KMeans), and keep the text "
        "nearest each centroid.",
    )
    s.add_argument("texts", help='a .jsonl of {"text": ...} lines or a .txt with one text per line')
    s.add_argument("--model", required=True, help="the fine-tuned model directory")
    s.add_argument("--out", default=None, help="output jsonl (default: MODEL/recall_samples.jsonl)")
    _add_config_args(s)
    s.set_defaults(func=_cmd_select)

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

    try:
        from recall_daemon.cli import add_daemon_commands
    except ImportError:
        add_daemon_commands = None
    if add_daemon_commands is not None:
        add_daemon_commands(sub)
    return parser


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
