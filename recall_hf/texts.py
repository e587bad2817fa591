"""The texts a task trained on, read from its train dataset (SPEC 2.1): the prompt side of chats and of tokenized
rows whose masks mark the answer, plain text otherwise. `RecallCallback` selects typical samples from them at train
end; its preflight dry-runs the same extraction on a few rows before step 1.
"""

from __future__ import annotations

import itertools
import logging
import random

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("messages", "prompt", "text", "input_ids")


def render_prompt(messages: list[dict], tokenizer) -> str | None:
    """The prompt side of a chat: every message before the final assistant turn, rendered with the chat template."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    prompt = messages[:last] if last is not None else list(messages)
    if not prompt:
        return None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    logger.warning("The tokenizer has no chat template; rendering chat prompts as 'role: content' lines.")

    def content(m: dict) -> str:
        c = m.get("content", "")
        return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if isinstance(p, dict))

    return "\n".join(f"{m.get('role', '')}: {content(m)}" for m in prompt)


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def prompt_token_ids(input_ids: list[int], supervised: list[bool] | None) -> list[int]:
    """Tokens before the last supervised span (the final answer) when a mask tells; all tokens otherwise."""
    if not supervised or all(supervised) or not any(supervised):
        return input_ids
    end = len(supervised)
    while not supervised[end - 1]:  # skip unsupervised tail (e.g. EOS left out of the loss)
        end -= 1
    start = end
    while start > 0 and supervised[start - 1]:
        start -= 1
    return input_ids[:start] if start > 0 else input_ids


def decode_row(row: dict, tokenizer) -> list[str]:
    """Texts of an already tokenized row: the prompt side (by `completion_mask` / `assistant_masks` / `labels`)."""
    ids = _as_list(row["input_ids"])
    if ids and isinstance(ids[0], list):  # a pre-batched row
        ids = ids[0]
    for key, supervised_if in (("completion_mask", 1), ("assistant_masks", 1), ("labels", None)):
        if key in row and row[key] is not None:
            values = _as_list(row[key])
            mask = [v == 1 for v in values] if supervised_if == 1 else [v != -100 for v in values]
            break
    else:
        mask = None
    if mask is not None and len(mask) != len(ids):
        mask = None
    lengths = row.get("seq_lengths")  # TRL packing: several sequences per row
    spans, start = [], 0
    for n in (_as_list(lengths) if lengths is not None else [len(ids)]):
        spans.append((start, start + int(n)))
        start += int(n)
    texts = []
    for a, b in spans:
        kept = prompt_token_ids(ids[a:b], mask[a:b] if mask else None)
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    try:
        first = dataset[0] if hasattr(dataset, "__getitem__") else next(iter(dataset))
    except (StopIteration, IndexError, KeyError, TypeError):
        return []
    return list(first.keys()) if hasattr(first, "keys") else []


def _rows(dataset, limit: int, seed: int):
    """At most `limit` rows: a seeded sample of a sized dataset (order kept), the first rows of an iterable one."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        idx = range(n) if n <= limit else sorted(random.Random(seed).sample(range(n), limit))
        if hasattr(dataset, "select"):  # datasets.Dataset: one Arrow read, rows as dicts
            yield from dataset.select(idx)
        else:
            for i in idx:
                yield dataset[i]
    else:
        yield from itertools.islice(iter(dataset), limit)


def dataset_texts(dataset, tokenizer, text_field: str | None = None, max_rows: int = 4000, seed: int = 0) -> list[str]:
    """The texts a task trained on, as RECALL's typical-sample selection wants them (SPEC 2.1).

    Column used (the first present): `text_field`; `messages` (chat, prompt side with the chat template and
    `add_generation_prompt=True`); `prompt` (string, or chat messages); `text`; `input_ids` (decoded; the prompt
    side when `completion_mask`, `assistant_masks` or `labels` mark the answer).

    Args:
        dataset: a `datasets.Dataset` / `IterableDataset`, or a torch dataset of dict rows.
        tokenizer: renders chats and decodes token ids.
        text_field: the column to use instead of the automatic choice.
        max_rows: rows read at most (a seeded sample of a sized dataset).
    """
    if dataset is None:
        raise ValueError("The trainer has no train dataset to take the task's texts from.")
    columns = _column_names(dataset)
    if text_field is not None:
        if columns and text_field not in columns:
            raise ValueError(f"text_field={text_field!r} is not a column of the train dataset; columns: {columns}.")
        field = text_field
    else:
        field = next((c for c in TEXT_COLUMNS if c in columns), None)
        if field is None:
            raise ValueError(f"Cannot find the task's texts in train dataset columns {columns}; expected one of "
                             f"{list(TEXT_COLUMNS)}, or pass text_field=COLUMN.")
    texts: list[str] = []
    for row in _rows(dataset, max_rows, seed):
        value = row[field]
        if field == "input_ids":
            texts.extend(decode_row(row, tokenizer))
        elif isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list) and (not value or isinstance(value[0], dict)):
            rendered = render_prompt(value, tokenizer)
            if rendered:
                texts.append(rendered)
        else:
            raise ValueError(f"Column {field!r} holds {type(value).__name__} values; expected text or chat messages.")
    return [t for t in texts if t and t.strip()]


def text_tokenizer(processing_class):
    """The text tokenizer of a tokenizer or multimodal processor."""
    return getattr(processing_class, "tokenizer", None) or processing_class
