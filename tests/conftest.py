"""Shared fixtures: where the real evaluation photos are (../shared/data beside the repo), and
checks run in a child process beside the real app (``run_beside_app``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("ANOMALY_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "bottle").is_dir():
        pytest.fail(f"real test photos not found at {root}; set ANOMALY_DATA_DIR")
    return root


@pytest.fixture
def compilations(monkeypatch):
    """The class names of the modules compiled for OpenVINO while the test runs, in order."""
    from anomaly import runtime

    names = []
    real = runtime.compile_module

    def counting(module, inputs, dynamic, precision, threads=None):
        names.append(type(module).__name__)
        return real(module, inputs, dynamic, precision, threads)
    monkeypatch.setattr(runtime, "compile_module", counting)
    return names


def category_files(root: Path, category: str, split: str, n: int | None = None) -> list[Path]:
    files = sorted(p for p in (root / category / split).iterdir() if p.is_file())
    return files[:n] if n else files


APP_ON_LOOPBACK = r"""
import json, socket, sys
import app
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
app.launch(port=port, prevent_thread_lock=True, quiet=True)
url = f"http://127.0.0.1:{port}/"
"""


def run_beside_app(checks: str, config: str, *args: str) -> dict:
    """Run ``checks`` (Python source) in a child process that first starts the real app on a
    free loopback port (its address in ``url``), with ``config`` as $ANOMALY_APP_CONFIG and
    ``args`` in ``sys.argv[1:]``; the checks leave their findings in a dict ``out`` -> it."""
    script = APP_ON_LOOPBACK + checks + 'print("RESULT" + json.dumps(out))\napp.demo.close()\n'
    env = {**os.environ, "ANOMALY_APP_CONFIG": config}
    run = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.split("RESULT", 1)[1].splitlines()[0])
