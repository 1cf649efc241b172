"""The same apps run under Flower's own `flwr run .` (local simulation SuperLink)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL_SUPERLINK_PORT = 39091  # where `flwr run .` starts its detached local SuperLink


def _listening_pids(port: int) -> list[int]:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_flwr_run_dot_runs_the_quickstart(tmp_path, real_data_dir):
    if not _port_free(LOCAL_SUPERLINK_PORT):
        pytest.fail(f"port {LOCAL_SUPERLINK_PORT} is busy: another local SuperLink is running", pytrace=False)
    bin_dir = Path(os.sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", MEDMNIST_DATA=str(real_data_dir),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "flwr").mkdir()
    out = tmp_path / "run"
    run_config = (f"model-preset='tiny' local-steps=3 num-server-rounds=2 out-dir='{out}' "
                  f"data-dir='{real_data_dir}'")
    try:
        subprocess.run([str(bin_dir / "flwr"), "run", ".", "--federation-config",
                        "num-supernodes=3 client-resources-num-cpus=1", "--run-config", run_config],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        # flwr's exit code is no evidence: poll the run's status instead.
        deadline, status = time.monotonic() + 400, None
        while time.monotonic() < deadline:
            listing = subprocess.run([str(bin_dir / "flwr"), "list", "--format", "json"], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=60).stdout
            runs = json.loads(listing[listing.index("{"):]).get("runs", []) if "{" in listing else []
            status = runs[0]["status"] if runs else None
            if status and status.startswith("finished"):
                break
            time.sleep(3)
        assert status == "finished:completed", status
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds_completed"] == 2
        assert set(summary["downstream"]) == {"breastmnist", "pneumoniamnist", "retinamnist"}
    finally:
        for pid in _listening_pids(LOCAL_SUPERLINK_PORT):
            os.kill(pid, signal.SIGTERM)
