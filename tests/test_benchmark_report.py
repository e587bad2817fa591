"""The continual benchmark's report: stream metrics, best-in-hindsight rows, task order (no model training)."""

from __future__ import annotations

import pytest

from benchmarks.continual import task_order
from benchmarks.report import best_in_hindsight, stream_metrics, summary_rows


def _row(method, family, options, acc, protocol="chain"):
    return {
        "method": method,
        "protocol": protocol,
        "family": family,
        "options": options,
        "seeds": [0],
        "ACC": acc,
        "ACC_std": 0.0,
    }


def test_best_in_hindsight_picks_the_best_mean_acc_per_sweep_and_names_it():
    rows = [
        _row("seqft", "seqft", {}, 0.60),
        _row("interp:alpha=0.3", "interp", {"alpha": 0.3}, 0.55),
        _row("interp:alpha=0.7", "interp", {"alpha": 0.7}, 0.66),
        _row("interp:alpha=0.5", "interp", {"alpha": 0.5}, 0.62),
        _row("recall:tau=0.05", "recall", {"tau": 0.05, "tv": 0}, 0.64),
        _row("recall", "recall", {"tau": 0.5, "tv": 0}, 0.61),
        _row("recall:tv=1", "recall", {"tau": 0.5, "tv": 1}, 0.70),  # another variant: no sweep of its own
        _row("ta:lam=0.3", "ta", {"lam": 0.3}, 0.50, protocol="from-base"),
    ]
    out = best_in_hindsight(rows)
    added = [r for r in out if r.get("hindsight")]
    assert [r["method"] for r in added] == [
        "interp (best α in hindsight: α=0.7)",
        "recall (best τ in hindsight: τ=0.05)",
    ]
    assert added[0]["ACC"] == 0.66 and added[0]["picked"] == "interp:alpha=0.7"
    # each added row follows its sweep's last member; the inputs are untouched
    names = [r["method"] for r in out]
    assert names.index(added[0]["method"]) == names.index("interp:alpha=0.5") + 1
    assert names.index(added[1]["method"]) == names.index("recall") + 1
    assert len(out) == len(rows) + 2 and not any(r.get("hindsight") for r in rows)


def test_best_in_hindsight_keeps_protocols_and_other_options_apart():
    rows = [
        _row("ta:lam=0.3", "ta", {"lam": 0.3}, 0.70, protocol="from-base"),
        _row("ta:lam=1.0", "ta", {"lam": 1.0}, 0.60, protocol="from-base"),
        _row("interp:alpha=0.3", "interp", {"alpha": 0.3}, 0.10, protocol="chain"),
        _row("interp:alpha=0.5", "interp", {"alpha": 0.5}, 0.90, protocol="from-base"),
        _row("ties:lam=0.5", "ties", {"lam": 0.5, "density": 0.2}, 0.65, protocol="from-base"),
        _row("ties:lam=1.0,density=0.5", "ties", {"lam": 1.0, "density": 0.5}, 0.75, protocol="from-base"),
    ]
    added = [r for r in best_in_hindsight(rows) if r.get("hindsight")]
    assert [r["method"] for r in added] == ["ta (best λ in hindsight: λ=0.3)"]


def test_stream_metrics_last_task_against_its_own_model_and_first_task_held():
    acc = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.5, 0.72]]
    m = stream_metrics(acc, [0.92, 0.75, 0.80])
    assert m["last_new"] == 0.72 and m["last_own"] == 0.80
    assert m["last_frac"] == pytest.approx(0.9)
    assert m["first_learned"] == 0.9 and m["first_final"] == 0.6
    assert m["first_held"] == pytest.approx(-0.3)
    assert stream_metrics(acc, None)["last_frac"] is None


def test_summary_rows_carry_stream_metrics_against_the_same_seeds_own_models():
    def run(seed, method, acc=None, final=None):
        r = {
            "seed": seed,
            "method": method,
            "protocol": "chain" if acc else "-",
            "metrics": {"ACC": 0.5, "BWT": None, "plasticity": None},
        }
        return {**r, "acc": acc, "family": "seqft", "options": {}} if acc else {**r, "final": final}

    results = {
        "config": {"model": "minilm", "lora": False},
        "methods": {"chain": ["seqft"]},
        "runs": [
            run(0, "task models (individual)", final=[0.9, 0.8]),
            run(1, "task models (individual)", final=[0.9, 0.4]),
            run(0, "seqft", acc=[[0.9, None], [0.7, 0.8]]),
            run(1, "seqft", acc=[[0.9, None], [0.5, 0.4]]),
        ],
    }
    row = next(r for r in summary_rows(results) if r["method"] == "seqft")
    assert row["last_frac"] == pytest.approx(1.0)  # 0.8/0.8 and 0.4/0.4
    assert row["first_held"] == pytest.approx(-0.3)


def test_task_order_presets_subtasks_and_seeded_shuffle():
    from benchmarks.assets import LONG_TASKS, SUBTASKS, TASK_INFO

    long = task_order("long")
    assert long == list(LONG_TASKS) and len(long) >= 10
    assert task_order("sentiment,news-outlet/1") == ["sentiment", "news-outlet/1"]
    shuffled = task_order("long", "shuffled", 0)
    assert sorted(shuffled) == sorted(long) and shuffled != long
    assert shuffled == task_order("long", "shuffled", 0) and shuffled != task_order("long", "shuffled", 1)
    for bad in ("sentiment", "sentiment,sentiment", "sentiment,news-outlet/9"):
        with pytest.raises(ValueError, match="need >= 2 distinct tasks"):
            task_order(bad)
    # every subtask names labels of its pool, and the long stream's subtasks of a pool do not share labels
    from benchmarks.assets import POOL_INFO

    used: dict[str, set[str]] = {}
    for name, (pool, labels) in SUBTASKS.items():
        assert set(labels) <= set(POOL_INFO[pool][0]), name
        assert not used.setdefault(pool, set()) & set(labels), name
        used[pool] |= set(labels)
    assert set(TASK_INFO) >= {n.split("/")[0] for n in SUBTASKS}


def test_a_subtask_keeps_only_its_labels_renumbered_in_its_own_order(monkeypatch):
    from benchmarks import assets

    words = assets.POOL_INFO["news-outlet"][0]
    pool = [(f"{w} article {i}", k) for k, w in enumerate(words) for i in range(30)]
    monkeypatch.setattr(assets, "_pool", lambda name: pool if name == "news-outlet" else [])
    task = assets.load_task("news-outlet/2", seed=3)
    assert task.labels == ["rte", "huffpost", "dw"]
    examples = task.train + task.test
    assert len(examples) == 90 and not set(task.train) & set(task.test)
    assert all(text.startswith(task.labels[label] + " ") for text, label in examples)
    assert task.train == assets.load_task("news-outlet/2", seed=3).train  # seeded, reproducible
    with pytest.raises(ValueError, match="unknown task 'news-outlet/7'"):
        assets.load_task("news-outlet/7")
