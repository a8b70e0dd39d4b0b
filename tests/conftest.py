"""Shared fixtures: where the real evaluation photos are (../shared/data beside the repo)."""
import os
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


def category_files(root: Path, category: str, split: str, n: int | None = None) -> list[Path]:
    files = sorted(p for p in (root / category / split).iterdir() if p.is_file())
    return files[:n] if n else files
