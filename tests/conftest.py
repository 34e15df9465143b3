"""Shared test set-up: make the flat project importable and keep torch on few threads."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)  # see NOTES.md: extra threads on a busy 2-core machine slow tiny matmuls ~20x
