"""The README's two commands are the front door: keep them true and in step with CI."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    blocks = _bash_blocks()
    main_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "medfl run simulations/configs/quickstart.yaml" in main_cmd
    assert main_cmd.startswith("python3.11 -m venv .venv") and test_cmd.startswith("python3.11 -m venv .venv")
    assert test_cmd.endswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "the README's test command must appear verbatim in .ci/run"


def test_pyproject_names_the_apps_and_the_console_script():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert meta["project"]["scripts"]["medfl"] == "simulations.cli:main"
    scenario = meta["tool"]["flwr"]["app"]["config"]["scenario"]
    assert (REPO / scenario).exists()
