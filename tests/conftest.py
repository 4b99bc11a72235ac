import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py helpers

from megaphi.platform import prepare_megatron_import  # noqa: E402

prepare_megatron_import()  # before any test module imports Megatron-Core

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "sample"
CHAT = Path(__file__).resolve().parents[1] / "examples" / "data" / "chat"
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def built_once(tmp_path_factory, name):
    """A directory for a session fixture, built once per test session rather than once per
    pytest-xdist worker: yields (path, needs_build). The first worker to arrive builds it
    under a lock, the others wait and reuse it; a build that fails leaves no marker, so the
    next worker tries again (and fails the same way)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, shared by the workers' popen-gwK/ directories
    path, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build = not done.exists()
        if build:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
        yield path, build
        if build:
            done.touch()


@pytest.fixture(scope="session")
def sample_mixture(tmp_path_factory):
    """Two real sources of the shipped sample corpus, preprocessed with the real pipeline, as
    a mixture with train (40/60) and valid blends."""
    from megaphi.data.tokenizer import Phi4Tokenizer

    with built_once(tmp_path_factory, "data") as (tmp, build):
        if build:
            write_mixture(tmp, Phi4Tokenizer())
    return tmp / "mix.yaml"


def write_mixture(tmp, tok):
    """The sample corpus's web and code sources tokenised with ``tok`` into ``tmp``, and their
    mixture, ``tmp/mix.yaml``."""
    from megaphi.data.preprocess import preprocess

    for source in ("web", "code"):
        preprocess([str(SAMPLE / f"{source}.jsonl")], str(tmp / source), tok, workers=1)
    (tmp / "mix.yaml").write_text("train:\n  web: {weight: 0.4, prefixes: [web]}\n"
                                  "  code: {weight: 0.6, prefixes: [code]}\n"
                                  "valid:\n  web: {weight: 1.0, prefixes: [web]}\n")


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    """The character-level Hugging Face tokenizer (102 ids) of
    megaphi.data.tokenizer.write_char_tokenizer: with it the tiny model needs 128 embedding
    rows instead of 100,352, so its steps, optimizer and checkpoints are ~30x smaller. For tests
    of training mechanics (resume, resharding, kills) where the vocabulary does not matter."""
    from megaphi.data.tokenizer import write_char_tokenizer

    with built_once(tmp_path_factory, "char_tokenizer") as (tmp, build):
        if build:
            write_char_tokenizer(str(tmp / "tok"))
    return tmp / "tok"


@pytest.fixture(scope="session")
def char_mixture(char_tokenizer, tmp_path_factory):
    """:func:`sample_mixture`'s corpus tokenised with :func:`char_tokenizer`; train with
    the :func:`char_model` overrides."""
    from megaphi.data.tokenizer import load_tokenizer

    with built_once(tmp_path_factory, "char_data") as (tmp, build):
        if build:
            write_mixture(tmp, load_tokenizer(str(char_tokenizer)))
    return tmp / "mix.yaml"


@pytest.fixture(scope="session")
def char_model(char_tokenizer) -> list:
    """The overrides that train the tiny model on :func:`char_tokenizer` data."""
    return [f"data.tokenizer={char_tokenizer}", "model.vocab_size=128"]


@pytest.fixture(scope="session")
def chat_mixture(tmp_path_factory):
    """The shipped Python-FAQ chat sample (examples/data/chat), preprocessed with the real
    pipeline (--format chat), as a mixture with train and valid blends."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    with built_once(tmp_path_factory, "chat") as (tmp, build):
        if build:
            for split in ("train", "valid"):
                preprocess([str(CHAT / f"faq_{split}.jsonl")], str(tmp / f"faq_{split}"),
                           Phi4Tokenizer(), workers=1, format="chat")
            (tmp / "mix.yaml").write_text(
                "train:\n  faq: {weight: 1.0, prefixes: [faq_train]}\n"
                "valid:\n  faq: {weight: 1.0, prefixes: [faq_valid]}\n")
    return tmp / "mix.yaml"


@pytest.fixture(scope="session")
def tiny_pretrained(sample_mixture, tmp_path_factory):
    """A briefly pre-trained tiny model (TP=1, 8 steps at 128 tokens): the starting point
    of post-training tests."""
    from distributed import megaphi_train

    with built_once(tmp_path_factory, "pretrained") as (tmp, build):
        if build:
            proc = megaphi_train(1, f"data.mixture={sample_mixture}",
                                 f"train.run_dir={tmp / 'run'}", "train.iters=8",
                                 "model.seq_length=128", "train.micro_batch_size=4",
                                 "train.global_batch_size=4", "schedule.warmup_iters=2",
                                 "optimizer.lr=2e-3",
                                 "data.num_workers=0", "logging.tensorboard=false",
                                 "train.log_interval=4")
            assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run"


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrained, chat_mixture, tmp_path_factory):
    """:func:`tiny_pretrained` after 6 SFT steps on the chat sample at TP=2 (2 processes;
    ``distributed.TINY_SFT``): test_sft_e2e's uninterrupted run and DPO's starting point."""
    from distributed import TINY_SFT, megaphi_train

    with built_once(tmp_path_factory, "sft") as (tmp, build):
        if build:
            proc = megaphi_train(2, *TINY_SFT, f"checkpoint.load={tiny_pretrained}",
                                 f"data.mixture={chat_mixture}", f"train.run_dir={tmp / 'run'}")
            assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run"


@pytest.fixture
def cli(capsys):
    """tools/preprocess_data.py's main() in this process: (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("preprocess_data_cli",
                                                  REPO / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = signal.getsignal(signal.SIGTERM)

    def run(*args):
        try:
            module.main([*map(str, args), "--no-progress"])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    signal.signal(signal.SIGTERM, handler)  # main() makes SIGTERM raise KeyboardInterrupt


# The slowest modules (torchrun launches, training runs), slowest first. pytest-xdist's
# --dist loadfile hands out modules in collection order, so starting these first keeps one
# long module from running alone at the end (longest-first scheduling on two workers).
SLOW_FIRST = ("test_recipe.py", "test_dpo.py", "test_pts_e2e.py", "test_sft_e2e.py",
              "test_hf_interop.py", "test_midtrain.py", "test_training.py", "test_sft.py",
              "test_adopt.py", "test_serve.py", "test_dpo_parity.py", "test_memory.py",
              "test_parallel_equivalence.py", "test_benchmark.py", "test_generate.py",
              "test_checkpoint_fixes.py", "test_trainer_loop.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = marker.kwargs.get("count", 1)
        if gpus < needed:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {needed} CUDA GPU{'s' if needed > 1 else ''}, found {gpus}"))
