import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py helpers

from megaphi.platform import quiet_megatron_warnings  # noqa: E402

quiet_megatron_warnings()  # before any test module imports Megatron-Core


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
