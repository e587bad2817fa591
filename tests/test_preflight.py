"""RecallCallback checks what it needs at train end in `on_train_begin`: a bad setup fails before step 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from recall_hf import RecallCallback, RecallConfig
from recall_hf.tiny import build_tiny_model

WORDS = "movie film actor scene plot story great boring question answer".split()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preflight") / "base"
    build_tiny_model("llama", path, texts=WORDS)
    return path


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps += 1


def qa_trainer(base_dir: Path, out: Path, callback: RecallCallback, counter: StepCounter, tokenizer=True,
               columns=("question", "answer")) -> Trainer:
    """A dataset tokenized by its collator (remove_unused_columns=False): training itself would run fine."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = {c: [f"{c} {w} movie" for w in WORDS] for c in columns}

    def collate(batch):
        enc = tok([" ".join(r[c] for c in columns) for r in batch], return_tensors="pt", padding=True)
        enc["labels"] = enc["input_ids"].clone()
        return enc

    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=4, report_to=[], disable_tqdm=True,
                             save_strategy="no", use_cpu=True, remove_unused_columns=False)
    return Trainer(AutoModelForCausalLM.from_pretrained(base_dir), args, train_dataset=Dataset.from_dict(rows),
                   data_collator=collate, processing_class=tok if tokenizer else None,
                   callbacks=[callback, counter])


def test_wrong_columns_fail_before_the_first_step(base_dir, tmp_path):
    counter = StepCounter()
    callback = RecallCallback(drop_dir=tmp_path / "drop", config=RecallConfig(k=2), progress=False)
    trainer = qa_trainer(base_dir, tmp_path / "out", callback, counter)
    with pytest.raises(ValueError, match=r"Cannot find the task's texts.*'question', 'answer'.*text_field") as err:
        trainer.train()
    assert counter.steps == 0 and trainer.state.global_step == 0
    assert "Nothing was trained" in str(err.value) and "\n" not in str(err.value)
    assert callback.checkpoint_dir is None and not any((tmp_path / "drop").iterdir())


def test_text_field_makes_the_same_setup_run(base_dir, tmp_path):
    counter = StepCounter()
    callback = RecallCallback(drop_dir=tmp_path / "drop", config=RecallConfig(k=2), text_field="question",
                              progress=False)
    qa_trainer(base_dir, tmp_path / "out", callback, counter).train()
    assert counter.steps == 2 and callback.drop_path is not None and (callback.drop_path / "READY").exists()


def test_missing_text_field_and_no_tokenizer_and_bad_destinations_in_one_error(base_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    counter = StepCounter()
    callback = RecallCallback(drop_dir=blocker / "drop", text_field="prompt", progress=False)
    trainer = qa_trainer(base_dir, tmp_path / "out", callback, counter, tokenizer=False)
    with pytest.raises(ValueError) as err:
        trainer.train()
    message = str(err.value)
    assert "(1) no tokenizer: pass processing_class=TOKENIZER" in message
    assert f"(2) {blocker / 'drop'} is not writable" in message and "(3)" not in message
    assert counter.steps == 0


def test_wrong_text_field_is_named(base_dir, tmp_path):
    counter = StepCounter()
    callback = RecallCallback(drop_dir=tmp_path / "drop", text_field="prompt", progress=False)
    with pytest.raises(ValueError, match=r"text_field='prompt' is not a column .*'question', 'answer'"):
        qa_trainer(base_dir, tmp_path / "out", callback, counter).train()
    assert counter.steps == 0


def test_save_strategy_no_still_gets_a_writable_output_dir(base_dir, tmp_path):
    """The Trainer creates no output_dir with save_strategy="no"; the callback's checkpoint needs one."""
    counter = StepCounter()
    callback = RecallCallback(config=RecallConfig(k=2), text_field="question", progress=False)
    trainer = qa_trainer(base_dir, tmp_path / "new" / "out", callback, counter)
    callback.trainer = trainer
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, processing_class=trainer.processing_class)
    assert (tmp_path / "new" / "out").is_dir() and not any((tmp_path / "new" / "out").iterdir())
