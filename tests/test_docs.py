from __future__ import annotations

from pathlib import Path

from recall_hf.docs import config_reference

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_current():
    assert config_reference() in (ROOT / "README.md").read_text(), "run `python -m recall_hf.docs` to refresh README"


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
