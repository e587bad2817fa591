"""Loading models, configs and tokenizers the one way recall-hf does it: fp32 for the math, quiet, no remote code.

Every `from_pretrained` in the library goes through here, with `trust_remote_code=False`: a merge, a validation or a
daemon never runs code shipped inside a model directory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import transformers

from .errors import first_line

# PEFT `task_type` -> the transformers auto class that carries the head those adapters were trained with.
TASK_MODEL_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
LM_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars (an unused head is expected when loading a backbone)."""
    tlog = transformers.utils.logging
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    """A model's config; a one-line `ValueError` naming the directory when it cannot be read."""
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config
        reason = first_line(err)
        raise ValueError(f"Cannot read config.json of {model_dir}: {reason}") from None


def model_class(config: transformers.PretrainedConfig, task_type: str | None = None) -> type:
    """The class to build a model with: the auto class of a PEFT `task_type`, else the class `config.architectures`
    names, else an auto class (with an LM head when the architecture's name says so)."""
    name = TASK_MODEL_CLASSES.get(task_type or "")
    arch = (getattr(config, "architectures", None) or [None])[0]
    if name is None and arch and hasattr(transformers, arch):
        name = arch
    if name is None:
        name = "AutoModelForCausalLM" if arch and arch.endswith(LM_HEAD_SUFFIXES) else "AutoModel"
    return getattr(transformers, name)


def load_tokenizer(model_dir: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded, with a pad token (EOS or UNK when the tokenizer has none)."""
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"No usable tokenizer in {model_dir} ({err}); save it next to the weights.") from None
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"Tokenizer in {model_dir} has no pad, eos or unk token to pad batches with.")
    return tok


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file() or (Path(path) / "tokenizer.json").is_file()


def _from_pretrained(cls, name: str | Path, dtype, device: str, device_map: str | None) -> torch.nn.Module:
    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if device_map:
        kwargs["device_map"] = device_map
    with quiet_transformers():
        model = cls.from_pretrained(name, **kwargs)
    if not device_map:
        model.to(device)
    return model.eval()


def load_backbone(model_dir: str | Path, device: str = "cpu", device_map: str | None = None) -> torch.nn.Module:
    """The model's backbone (no LM/classification head) in fp32 for forward passes."""
    return _from_pretrained(transformers.AutoModel, model_dir, torch.float32, device, device_map)


def load_model(
    name: str | Path,
    task_type: str | None = None,
    device: str = "cpu",
    device_map: str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> torch.nn.Module:
    """A whole model with its head (`model_class`), in `dtype` (fp32 by default; `"auto"` keeps the stored one)."""
    return _from_pretrained(model_class(load_config(name), task_type), name, dtype, device, device_map)


def build_on_meta(config: transformers.PretrainedConfig) -> torch.nn.Module:
    """The model `config` describes, built on the meta device (no memory), to read its module tree."""
    cls = model_class(config)
    with torch.device("meta"):
        return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)


def resolve_base(base: str) -> str:
    """The base model name, checked: a local directory with a config, or a hub id available offline."""
    if Path(base).is_dir():
        if not (Path(base) / "config.json").is_file():
            raise ValueError(f"Base model directory {base} has no config.json; pass the right directory with --base.")
        return base
    try:
        load_config(base)
    except ValueError:
        raise ValueError(f"Base model {base!r} (base_model_name_or_path of the adapters) is not a local directory nor "
                         "available offline; pass the base model directory with --base.") from None
    return base
