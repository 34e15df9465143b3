"""Shared test set-up: make the flat project importable and keep torch on few threads."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "shared" if (ROOT / "shared").is_dir() else ROOT.parent / "shared"  # a student copy has its own
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # see NOTES.md: extra threads on a busy 2-core machine slow tiny matmuls ~20x


@pytest.hookimpl(tryfirst=True)  # before -k deselects
def pytest_collection_modifyitems(items):
    """A test marked `@pytest.mark.exercise(N)` can be picked by `-k exNN` and reports N in --junitxml."""
    for item in items:
        marker = item.get_closest_marker("exercise")
        if marker is not None:
            item.extra_keyword_matches.add(f"ex{marker.args[0]:02d}")
            item.user_properties.append(("exercise", marker.args[0]))
