"""The offline re-pick of calibrated folds (benchmarks/calibrated_diag.py) on a hand-built step record."""

from __future__ import annotations

import json

import pytest

from benchmarks.calibrated_diag import main, minimax, step_rows


def _record() -> dict:
    # Two tasks: "old" (scale 0.1) and "new" (scale 1.0). KL on typical samples favours a=0.75; the held-out KL and
    # both agreements favour a=0.5, which also has the best test accuracy.
    cands = ["keep", "new", "constant:0.5", "constant:0.75"]
    kl = {"keep": (0.0, 1.0), "new": (0.1, 0.0), "constant:0.5": (0.04, 0.5), "constant:0.75": (0.045, 0.2)}
    held = {"keep": (0.0, 1.0), "new": (0.2, 0.0), "constant:0.5": (0.02, 0.3), "constant:0.75": (0.12, 0.1)}
    agree = {"keep": (1.0, 0.5), "new": (0.5, 1.0), "constant:0.5": (0.9, 0.9), "constant:0.75": (0.7, 0.95)}
    acc = {"keep": (0.8, 0.5), "new": (0.5, 0.9), "constant:0.5": (0.78, 0.85), "constant:0.75": (0.7, 0.88)}
    pair = lambda v: {"old": v[0], "new": v[1]}  # noqa: E731
    return {
        "chosen": "constant:0.75",
        "scales": {"old": 0.1, "new": 1.0},
        "diag_scales": {"old": 0.1, "new": 1.0},
        "divergence": {c: pair(kl[c]) for c in cands},
        "diag": {c: {"acc": pair(acc[c]), "heldout": pair(held[c]), "agree": pair(agree[c]),
                     "agree_heldout": pair(agree[c])} for c in cands},
    }


def test_minimax_is_the_largest_scaled_loss_above_the_better_endpoint():
    rec = _record()
    value = minimax(rec["divergence"], rec["scales"])
    # constant:0.75: old (0.045 - 0) / 0.1 = 0.45, new (0.2 - 0) / 1 = 0.2 -> 0.45; constant:0.5: max(0.4, 0.5).
    assert value["constant:0.75"] == pytest.approx(0.45) and value["constant:0.5"] == pytest.approx(0.5)
    assert value["keep"] == pytest.approx(1.0)
    assert value["new"] == pytest.approx(1.0)


def test_step_rows_repick_each_objective_and_report_the_picks_accuracy():
    rows = step_rows(_record())
    assert rows["chosen by the run"] == ("constant:0.75", pytest.approx(0.79))
    assert rows["fixed a=0.5"] == ("constant:0.5", pytest.approx(0.815))
    assert rows["minimax, KL typical"][0] == "constant:0.75"  # what the run chose
    assert rows["minimax, KL held-out"][0] == "constant:0.5"  # max(0.2, 0.3) beats max(1.2, 0.1)
    assert rows["mean, disagreement typical"][0] == "constant:0.5"  # 0.1 mean disagreement vs 0.175
    assert rows["best candidate in hindsight"] == ("constant:0.5", pytest.approx(0.815))


def test_cli_reports_from_result_folders_and_refuses_a_folder_without_results(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"runs": [{"seed": 0, "protocol": "chain",
                                                             "recall": [_record()]}]}))
    main([str(run), "--out", str(tmp_path / "diag.md")])
    assert "| fixed a=0.5 | 0.8150 | +0.0000 | 0 / 1 / 0 |" in capsys.readouterr().out
    assert (tmp_path / "diag.md").read_text().startswith("1 fold decisions")
    with pytest.raises(SystemExit, match="No results.json"):
        main([str(tmp_path / "missing")])
