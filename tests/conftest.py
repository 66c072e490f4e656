"""Shared test helpers: the repository root on sys.path and the optional ../shared folder."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_dir():
    """The developers' ../shared folder (real MSR-VTT annotations, videos, NLTK data), or skip."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: it exists only on the developers' machines")
    return SHARED
