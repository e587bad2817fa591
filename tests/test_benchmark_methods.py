"""Formulas of the benchmark's merge variants (benchmarks/methods.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.methods import parse_method, recall_ta_coefficients


def test_recall_shaped_task_arithmetic_is_task_arithmetic_when_layers_agree():
    # Step 3 (deployed carries 2 tasks): equal similarities give the running-mean weight 1/3 to the new model.
    weights = torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]])
    c = recall_ta_coefficients(weights, [2, 1], lam=0.5)
    assert c[:, 0].tolist() == [1.0, 1.0]  # what is deployed is never shrunk
    assert c[0, 1].item() == pytest.approx(0.5)  # = task arithmetic with lambda 0.5
    assert c[1, 1].item() == pytest.approx(0.75)  # a diverging layer gives the new update more
    # The base (count 0) gets no coefficient.
    c = recall_ta_coefficients(torch.tensor([[0.0, 2 / 3, 1 / 3]]), [0, 2, 1], lam=1.0)
    assert c.tolist() == [[0.0, 1.0, pytest.approx(1.0)]]


def test_method_specs_parse_and_reject_bad_options():
    spec = parse_method("recall:tv=1,lam=0.5,old=1")
    assert spec.options["lam"] == 0.5 and spec.options["old"] == 1 and spec.options["tv"] == 1
    with pytest.raises(ValueError, match="bad option"):
        parse_method("recall:lamda=0.5")
    assert parse_method("calibrated:new=0.5").options == {"new": 0.5, "k": 32, "norm": 0, "rule": "mean", "diag": 0,
                                                          "grid": 0, "steps": 4}
    assert parse_method("calibrated:rule=minimax").options["rule"] == "minimax"
    with pytest.raises(ValueError, match="rule must be one of minimax, mean"):
        parse_method("calibrated:rule=minmax")  # refused when parsed, not after the task models are trained
    assert parse_method("calibrated:steps=1").options["steps"] == 1
    for bad, why in (("steps=0", "steps must be >= 1"), ("steps=1.5", "is not a int")):
        with pytest.raises(ValueError, match=why):
            parse_method(f"calibrated:{bad}")
