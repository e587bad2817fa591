"""The pinned transformers/peft pair works together (constraints.txt): transformers 5.24 requires peft >= 0.22,
which is not released, and its PEFT integration refused `model.active_adapters()` with peft 0.21.2."""

from __future__ import annotations

from peft import LoraConfig

from recall_hf.tiny import build_tiny_model


def test_transformers_peft_integration_lists_active_adapters():
    model, _ = build_tiny_model("llama", layers=1)
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="task")
    assert model.active_adapters() == ["task"]
