import sys
from pathlib import Path

import pytest

# The helpers of tests/ (checkpoints.py, test_batch.py, ...) import as top-level modules here too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyengine import _C  # noqa: E402

HAS_GPU = bool(_C.has_cuda) and _C.cuda_device_count() > 0


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a build with the CUDA backend")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
