"""Datasets made by Megatron-LM's tools (Megatron-Core's IndexedDatasetBuilder alone, no
meta.json): refused by training up front with one line naming --adopt; adopted by
tools/preprocess_data.py --adopt after its checks; then trained exactly like megaphi's own."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distributed import ROOT, logged_losses, megaphi_train

SAMPLE = ROOT / "examples" / "data" / "sample" / "web.jsonl"
DOCS = 16
TRAIN = ["train.iters=3", "train.log_interval=1", "model.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=4", "schedule.warmup_iters=0",
         "data.num_workers=0", "logging.tensorboard=false"]


def texts():
    lines = SAMPLE.read_text().splitlines()[:DOCS]
    return [json.loads(line)["text"] for line in lines]


def megatron_lm_dataset(prefix: Path, ids_of_docs, dtype=np.int32) -> Path:
    """What Megatron-LM's tools/preprocess_data.py writes: IndexedDatasetBuilder, one
    document per input, nothing else."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in ids_of_docs:
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def phi4_ids():
    from megaphi.data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    return [tok.tokenize(t) + [tok.eod_id] for t in texts()]


def digest(prefix: Path) -> dict:
    return {s: hashlib.sha256(Path(f"{prefix}{s}").read_bytes()).hexdigest()
            for s in (".bin", ".idx")}


def adopt(*argv):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
                           "--adopt", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


def mixture(directory: Path, prefix_name: str) -> Path:
    path = directory / f"{prefix_name}.yaml"
    path.write_text(f"train:\n  web: {{weight: 1.0, prefixes: [{prefix_name}]}}\n")
    return path


@pytest.fixture(scope="module")
def megatron_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron")
    return megatron_lm_dataset(d / "web_text_document", phi4_ids())


def test_training_refuses_it_up_front_naming_adopt(megatron_data, tmp_path):
    mix = mixture(megatron_data.parent, "web_text_document")
    proc = megaphi_train(1, f"data.mixture={mix}", f"train.run_dir={tmp_path / 'run'}", *TRAIN)
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert errors == [errors[0]] and errors[0].startswith("megaphi-train: error: "), errors
    assert f"--adopt {megatron_data}" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "phase pretrain; model:" not in proc.stderr  # no runtime, no model was built
    assert not (tmp_path / "run").exists()


def test_adopted_dataset_trains_exactly_like_megaphis_own(megatron_data, tmp_path):
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    before = digest(megatron_data)
    proc = adopt(megatron_data)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert f"{megatron_data}: {DOCS} documents" in line
    for check in ("readable: ok", "dtype: int32 ok", "ids in vocabulary: all < 100,352",
                  "end of document: every document", "round trip: 100% of 16 sampled"):
        assert check in line, line
    assert digest(megatron_data) == before  # .bin and .idx untouched
    meta = json.loads(Path(f"{megatron_data}.meta.json").read_text())
    assert meta["adopted"]["eod_terminated"] and meta["documents"] == DOCS

    src = tmp_path / "web.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    preprocess([str(src)], str(tmp_path / "own"), Phi4Tokenizer(), workers=1)
    runs = {}
    for name, mix in (("adopted", mixture(megatron_data.parent, "web_text_document")),
                      ("own", mixture(tmp_path, "own"))):
        proc = megaphi_train(1, f"data.mixture={mix}", f"train.run_dir={tmp_path / name}",
                             *TRAIN)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = logged_losses(tmp_path / name)
    assert len(runs["own"]) == 3 and runs["adopted"] == runs["own"]


def test_ids_of_another_tokenizer_fail_the_round_trip(tmp_path):
    """A stand-in for another BPE: Phi-4's ids through a fixed random permutation of the
    ordinary tokens (in range, documents still end with the end-of-document id)."""
    perm = np.random.default_rng(0).permutation(100000)
    other = [[int(perm[i]) if i < 100000 else i for i in ids] for ids in phi4_ids()]
    prefix = megatron_lm_dataset(tmp_path / "other_text_document", other)
    before = digest(prefix)
    proc = adopt(prefix)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preprocess_data: error: --adopt"), err
    assert "of 16 sampled documents decode and re-encode to the same ids" in err[0]
    assert "only 0% of 16" in err[0] and "--tokenizer" in err[0]
    assert not Path(f"{prefix}.meta.json").exists() and digest(prefix) == before


def test_an_id_past_the_vocabulary_is_refused_naming_the_document(tmp_path):
    docs = phi4_ids()
    docs[7][3] = 100352 + 5
    prefix = megatron_lm_dataset(tmp_path / "bad_text_document", docs)
    before = digest(prefix)
    proc = adopt(prefix)
    assert proc.returncode == 2
    assert "document 7 holds token id 100357, outside the vocabulary of phi4" in proc.stderr
    assert not Path(f"{prefix}.meta.json").exists() and digest(prefix) == before


def test_documents_without_eod_need_the_flag_and_narrow_dtypes_are_refused(tmp_path):
    prefix = megatron_lm_dataset(tmp_path / "noeod_text_document",
                                 [ids[:-1] for ids in phi4_ids()])
    proc = adopt(prefix)
    assert proc.returncode == 2
    assert "16 of 16 documents do not end with the end-of-document id 100257" in proc.stderr
    assert "--allow-missing-eod" in proc.stderr
    proc = adopt(prefix, "--allow-missing-eod")
    assert proc.returncode == 0, proc.stderr
    assert "end of document: 16 of 16 documents without it (allowed)" in proc.stdout
    assert not json.loads(Path(f"{prefix}.meta.json").read_text())["adopted"]["eod_terminated"]
    again = adopt(prefix)
    assert again.returncode == 2 and "exists already" in again.stderr

    narrow = megatron_lm_dataset(tmp_path / "u16_text_document", [[1, 2, 3, 100257 % 65536]],
                                 dtype=np.uint16)
    proc = adopt(narrow)
    assert proc.returncode == 2 and "tokens are uint16, which holds ids up to 65,535" in proc.stderr
    proc = adopt(tmp_path / "nothing_text_document")
    assert proc.returncode == 2 and "nothing_text_document.bin does not exist" in proc.stderr


def test_a_dataset_of_another_tokenizer_is_refused_before_the_runtime(tmp_path, char_tokenizer):
    """The fingerprint check runs up front too: char-tokenised data, a Phi-4 run."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import load_tokenizer

    src = tmp_path / "web.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()[:4]))
    preprocess([str(src)], str(tmp_path / "chars"), load_tokenizer(str(char_tokenizer)),
               workers=1)
    proc = megaphi_train(1, f"data.mixture={mixture(tmp_path, 'chars')}",
                         f"train.run_dir={tmp_path / 'run'}", *TRAIN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"megaphi-train: error: {tmp_path / 'chars'}: tokenised with hf:" in proc.stderr
    assert "phase pretrain; model:" not in proc.stderr


def test_an_empty_dataset_is_refused_before_the_runtime(tmp_path):
    """A dataset preprocessed from an empty input (for example a PTS run that found no pairs)
    is one error line naming it, not Megatron's mmap traceback after the model is built."""
    from megaphi.data.datasets import check_datasets_tokenizer
    from megaphi.data.preprocess import PreprocessError, preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    (tmp_path / "empty.jsonl").write_text("")
    for name, fmt in (("text", "text"), ("pairs", "preference")):
        preprocess([str(tmp_path / "empty.jsonl")], str(tmp_path / name), Phi4Tokenizer(),
                   workers=1, format=fmt)
    proc = megaphi_train(1, f"data.mixture={mixture(tmp_path, 'text')}",
                         f"train.run_dir={tmp_path / 'run'}", *TRAIN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megaphi-train: error: {tmp_path / 'text'}: holds no documents (its inputs "
        f"{tmp_path / 'empty.jsonl'} gave none); remove it from data.mixture or preprocess data "
        "that has documents")
    assert "phase pretrain; model:" not in proc.stderr
    with pytest.raises(PreprocessError, match="pairs: holds no pairs"):
        check_datasets_tokenizer([str(tmp_path / "pairs")], Phi4Tokenizer(), 100352)
