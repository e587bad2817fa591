from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROBES

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
