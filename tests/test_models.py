"""Loading (recall_hf.models): the model class for a config and that no load runs remote code."""

from __future__ import annotations

import transformers

from recall_hf import models
from recall_hf.tiny import tiny_config


def test_model_class_prefers_task_type_then_architecture_then_auto():
    config = tiny_config("llama", vocab_size=64)
    assert models.model_class(config, "SEQ_CLS") is transformers.AutoModelForSequenceClassification
    assert models.model_class(config) is getattr(transformers, config.architectures[0])
    config.architectures = ["SomeoneElsesForCausalLM"]
    assert models.model_class(config) is transformers.AutoModelForCausalLM
    config.architectures = None
    assert models.model_class(config) is transformers.AutoModel


def test_every_load_refuses_remote_code(model_pair, monkeypatch):
    """Config, tokenizer and weights are all loaded with trust_remote_code=False."""
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    a, _ = model_pair["llama"]
    models.load_config(a)
    models.load_tokenizer(a)
    models.load_backbone(a)
    assert {name for name, _ in seen} >= {"AutoConfig", "AutoTokenizer", "AutoModel"}
    assert all(flag is False for _, flag in seen), seen
