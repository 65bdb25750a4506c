import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
MEDIA = SHARED / "media"
WEIGHTS = SHARED / "weights"


def need(path: Path, what: str) -> Path:
    """Skip (with the reason) when a file from ../shared is not there."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (tests that need ../shared skip without it)")
    return path


@pytest.fixture
def media():
    return need(MEDIA, "../shared/media")


@pytest.fixture
def shared_weights():
    return need(WEIGHTS, "../shared/weights")
