"""Continual LoRA with `RecallCallback`: one adapter per task, folded into one merged adapter by RECALL.

Every task trains a fresh LoRA adapter on the same frozen base. When training ends the callback writes an adapter
task checkpoint (`adapter_config.json` + `adapter_model.safetensors` + typical samples) and folds it into
`<workdir>/merged` with RECALL's adapter-level merge (`recall_merge` on adapter directories: per-layer weights, factors
stacked exactly, optionally compressed with `--max-rank`). The result is a normal PEFT adapter of the base.

    python examples/continual_lora.py                     # tiny model built offline, about a minute on a laptop CPU
    python examples/continual_lora.py --model DIR --steps 200 --lr 2e-4 --workdir runs/lora

Tasks and evaluation are those of `continual_full.py` (tasks from `demo_tasks.py`). On the randomly initialised tiny
base, adapters learn little in a minute: the default run shows the mechanics; use `--model` for meaningful numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from continual_full import accuracy, task_dataset  # noqa: E402
from demo_tasks import TASKS, vocabulary_texts  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from recall_hf import RecallCallback, RecallConfig  # noqa: E402
from recall_hf.tiny import build_tiny_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a causal LM directory (default: build a tiny Llama offline)")
    p.add_argument("--workdir", help="where runs, adapters and the merged adapter go (default: a temp dir)")
    p.add_argument("--drop-dir", help="also publish every adapter task checkpoint to this drop folder")
    p.add_argument("--steps", type=int, default=60, help="training steps per task (default: 60)")
    p.add_argument("--n-train", type=int, default=256, help="training examples per task (default: 256)")
    p.add_argument("--n-eval", type=int, default=64, help="evaluation examples per task (default: 64)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: 1e-2; ~2e-4 for real models)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--max-rank", type=int, help="compress the merged adapter to this rank (truncated SVD)")
    p.add_argument("--k", type=int, default=16, help="typical samples per task (default: 16)")
    p.add_argument("--tau", type=float, default=RecallConfig.tau, help="RECALL softmax temperature")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="recall_lora_"))
    base_dir = Path(args.model) if args.model else workdir / "base"
    if args.model is None and not base_dir.exists():
        build_tiny_model("llama", base_dir, texts=vocabulary_texts(), hidden=64, layers=4)
    base_dir = base_dir.resolve()  # adapters record it as their base; the merge finds the base through it
    merged = workdir / "merged"
    config = RecallConfig(k=args.k, tau=args.tau, max_rank=args.max_rank,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "right"
    last = None
    for task in TASKS:
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
        callback = RecallCallback(drop_dir=args.drop_dir, merge_into=merged, config=config, task_name=task.name)
        trainer = Trainer(
            model,
            TrainingArguments(str(workdir / f"run-{task.name}"), max_steps=args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                              logging_steps=max(args.steps // 3, 1), save_strategy="no", report_to=[]),
            train_dataset=task_dataset(task, tok, args.n_train, seed=0),
            processing_class=tok,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            callbacks=[callback],
        )
        trainer.train()
        own = accuracy(trainer.model, tok, task, args.n_eval)
        print(f"[{task.name}] accuracy of the task's own adapter: {own:.2f}")
        if callback.report is not None:
            print(f"[{task.name}] RECALL weight of the new adapter per layer:",
                  " ".join(f"{w:.2f}" for w in callback.report.newest_weight))
        last = callback.checkpoint_dir

    models = {name: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path)
              for name, path in (("last task adapter", last), ("RECALL merged", merged))}
    print(f"\n{'task':<12}" + "".join(f"{name:>20}" for name in models))
    for task in TASKS:
        print(f"{task.name:<12}" + "".join(f"{accuracy(m, tok, task, args.n_eval):>20.2f}" for m in models.values()))
    print(f"\nMerged adapter: {merged} -> {merged.resolve()} (base {base_dir})")


if __name__ == "__main__":
    main()
