"""The offline re-pick of calibrated folds (benchmarks/calibrated_diag.py) on a hand-built step record."""

from __future__ import annotations

import json

import pytest

from benchmarks.calibrated_diag import NotStored, main, minimax, replay_search, search_lines, step_rows


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


def _quadratic_record(points: list[float]) -> dict:
    """Divergences exactly quadratic in a: old 0.9 a^2 (scale 0.1), new (1 - a)^2 (scale 1): the minimax regret
    max(9 a^2, (1 - a)^2) is least at a = 0.25."""
    name = lambda a: {0.0: "keep", 1.0: "new"}.get(a, f"constant:{a:g}")  # noqa: E731
    return {"scales": {"old": 0.1, "new": 1.0},
            "divergence": {name(a): {"old": 0.9 * a * a, "new": (1 - a) ** 2} for a in points}}


def test_replay_search_runs_the_library_search_on_stored_scores():
    pick, scored = replay_search(_quadratic_record([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert (pick, scored) == ("constant:0.25", 4)  # keep, new, 0.5, then the quadratic model's exact proposal
    with pytest.raises(NotStored, match="constant:0.25"):
        replay_search(_quadratic_record([0.0, 0.5, 0.75, 1.0]))
    lines = search_lines([("run", 2, _quadratic_record([0.0, 0.25, 0.5, 1.0]))])
    assert "best stored candidate in 1 of 1 steps, scoring 4.00 candidates where the run scored 4.00" in lines[0]


def test_replay_search_steps_inward_from_a_line_end():
    # MiniLM from one base, seed 1, step 2 (mm-minilm-s1): the new task's divergence is sigmoid-shaped along a and not
    # 0 at a = 1 (N lies off the line), so the model through 0, 0.5, 1 predicts no gain at 0.875 (max(0.10, 0.19)
    # against 0.131 at a = 1); the best so far is the line's end, so the first refinement step scores it anyway
    div = {"keep": (0.000, 0.996), "constant:0.25": (0.010, 0.887), "constant:0.5": (0.038, 0.576),
           "constant:0.75": (0.070, 0.184), "constant:0.875": (0.086, 0.070), "constant:1": (0.131, 0.044),
           "new": (0.827, 0.000)}
    rec = {"scales": {"old": 1.0, "new": 1.0}, "divergence": {c: {"old": o, "new": n} for c, (o, n) in div.items()}}
    assert replay_search(rec) == ("constant:0.875", 5)  # keep, new, 0.5, 1, then 0.875
