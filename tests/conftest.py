import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py helpers

from megaphi.platform import quiet_megatron_warnings  # noqa: E402

quiet_megatron_warnings()  # before any test module imports Megatron-Core

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "sample"


@pytest.fixture(scope="session")
def sample_mixture(tmp_path_factory):
    """Two real sources of the shipped sample corpus, preprocessed with the real pipeline, as
    a mixture with train (40/60) and valid blends."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    tmp = tmp_path_factory.mktemp("data")
    for source in ("web", "code"):
        preprocess([str(SAMPLE / f"{source}.jsonl")], str(tmp / source), Phi4Tokenizer(), workers=1)
    path = tmp / "mix.yaml"
    path.write_text("train:\n  web: {weight: 0.4, prefixes: [web]}\n"
                    "  code: {weight: 0.6, prefixes: [code]}\n"
                    "valid:\n  web: {weight: 1.0, prefixes: [web]}\n")
    return path


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = marker.kwargs.get("count", 1)
        if gpus < needed:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {needed} CUDA GPU{'s' if needed > 1 else ''}, found {gpus}"))
