from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import PROBES

from recall_hf import RecallConfig, __version__
from recall_hf.cli import main


def test_merge_cli_end_to_end(model_pair, tmp_path, capsys):
    a, b = model_pair["gpt2"]
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROBES))
    rc = main(
        [
            "merge",
            str(a),
            str(b),
            "--out",
            str(tmp_path / "out"),
            "--probes",
            str(probes),
            "--tau",
            "0.2",
            "--similarity",
            "linear_cka",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "out" / "recall_report.json").read_text())
    assert report["config"]["tau"] == 0.2 and report["config"]["similarity"] == "linear_cka"
    assert "Merged 2 models" in capsys.readouterr().out


def test_merge_cli_bad_input_one_line_error(model_pair, tmp_path, capsys):
    a, _ = model_pair["llama"]
    rc = main(["merge", str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_similarity_lists_choices(model_pair, tmp_path, capsys):
    a, b = model_pair["llama"]
    rc = main(["merge", str(a), str(b), "--out", str(tmp_path / "o"), "--similarity", "euclid"])
    assert rc == 2 and "linear_cka" in capsys.readouterr().err


def test_select_samples_cli(model_pair, tmp_path):
    _, b = model_pair["llama"]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"{t} {i}" for i in range(3) for t in PROBES))
    assert main(["select-samples", str(texts), "--model", str(b), "-k", "4", "--out", str(tmp_path / "s.jsonl")]) == 0
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"text", "cluster", "cluster_size"} <= set(json.loads(lines[0]))


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "recall_hf.cli", "merge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--probes" in out.stdout


def test_version_and_fast_help_without_torch():
    """`--help` and `--version` import neither torch nor the daemon (plugins are found by entry point)."""
    code = ("import sys; from recall_hf.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"recall-hf {__version__}" in out.stdout and out.stdout.strip().endswith("False False")


def test_config_flags_come_from_recall_config(capsys):
    """Every RecallConfig field is a `merge` flag with its help and choices; `select-samples` gets only its own."""
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    merge_help = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RecallConfig):
        flag = ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert flag in merge_help, flag
        assert " ".join(f.metadata["help"].split()) in merge_help, f.name
    assert "{convex,task_vector}" in merge_help and "-k K, --k K" in merge_help
    with pytest.raises(SystemExit):
        main(["select-samples", "--help"])
    select_help = capsys.readouterr().out
    assert "--max-candidates" in select_help and "--tau" not in select_help and "--fusion" not in select_help


def test_broken_plugin_is_reported_not_dropped(monkeypatch, capsys):
    """A command plugin whose import fails keeps its command, which fails with the reason; a warning says so."""
    from importlib import metadata

    broken = metadata.EntryPoint("daemon", "recall_daemon_missing.cli:add_daemon_commands", "recall_hf.commands")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [broken] if group == "recall_hf.commands" else [])
    assert main(["daemon", "--drop", "d"]) == 2
    err = capsys.readouterr().err
    assert "warning: commands 'daemon'" in err and "recall_daemon_missing" in err
    assert "recall-hf daemon: error: the 'daemon' commands" in err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("tau", ["nan", "inf", "-inf", "0", "-1"])
def test_merge_cli_refuses_non_finite_or_non_positive_tau(model_pair, tmp_path, capsys, tau):
    a, b = model_pair["llama"]
    rc = main(["merge", str(a), str(b), "--out", str(tmp_path / "o"), f"--tau={tau}"])
    err = _one_line_error(capsys)
    assert rc == 2 and "RecallConfig.tau must be" in err and not (tmp_path / "o").exists()


def test_recall_config_refuses_non_finite_floats():
    with pytest.raises(ValueError, match=r"^RecallConfig.tau must be a finite number, got nan\.$"):
        RecallConfig(tau=float("nan"))
    with pytest.raises(ValueError, match="tau must be a finite number, got inf"):
        RecallConfig(tau=float("inf"))
    assert RecallConfig(tau=1e-3).tau == 1e-3


@pytest.mark.parametrize("counts", ["1,x", "1,,2", "1,-1", "0,1", "1.5,1", ","])
def test_merge_cli_task_counts_says_what_is_expected(model_pair, tmp_path, capsys, counts):
    a, b = model_pair["llama"]
    rc = main(["merge", str(a), str(b), "--out", str(tmp_path / "o"), "--task-counts", counts])
    err = _one_line_error(capsys)
    assert rc == 2 and "comma-separated positive integers" in err and repr(counts) in err
    assert "invalid literal" not in err and not (tmp_path / "o").exists()


def test_merge_cli_refuses_the_same_folder_twice(model_pair, tmp_path, capsys, monkeypatch):
    a, b = model_pair["llama"]
    link = tmp_path / "alias"
    link.symlink_to(a, target_is_directory=True)
    monkeypatch.chdir(a.parent)
    spellings = [[str(a), str(a)], [str(a), f"./{a.name}/"], [str(a), str(b), str(link)],
                 [f"{a.parent}/../{a.parent.name}/{a.name}", a.name]]
    for models in spellings:
        rc = main(["merge", *models, "--out", str(tmp_path / "o")])
        err = _one_line_error(capsys)
        assert rc == 2 and "are the same folder" in err and "give each model once" in err, models
        assert not (tmp_path / "o").exists()
