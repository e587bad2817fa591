"""The merge report's plot (recall_hf.report)."""

from __future__ import annotations


def test_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook user's backend must survive a merge (pyplot + `matplotlib.use("Agg")` switched it process-wide)."""
    import matplotlib

    from recall_hf.report import MergeReport, plot_report

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        report = MergeReport(out_dir=str(tmp_path), kind="full", models=["a", "b"], task_counts=[1, 1],
                             output_task_count=2, config={"similarity": "rbf", "tau": 0.5}, probes=["x"],
                             similarities=[[[1.0, 0.9], [0.9, 1.0]]] * 3, weights=[[0.4, 0.6]] * 3)
        plot_report(report, tmp_path / "plot.png")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)
