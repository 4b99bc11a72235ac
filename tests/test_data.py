"""Tokenizer, mixtures, blended Megatron datasets, the resumable loader and the mix report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megaphi.data.loader import PretrainingSampler, build_loader
from megaphi.data.mixture import (
    MixtureError,
    load_mixture,
    mixture_report,
    parse_token_count,
)
from megaphi.data.tokenizer import Phi4Tokenizer, phi4_special_tokens

ROOT = Path(__file__).resolve().parents[1]
TOK = Phi4Tokenizer()


# ----------------------------------------------------------------------------- tokenizer

def test_phi4_encoding_example_exactly():
    text = "<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>"
    assert TOK.encode(text) == [100264, 9906, 100266, 4435, 100265, 100349]
    assert TOK.decode([100264, 9906, 100266, 4435, 100265, 100349]) == text


def test_phi4_special_token_table():
    special = phi4_special_tokens()
    assert special["<|endoftext|>"] == TOK.eod_id == TOK.bos_id == 100257
    assert special["<|im_end|>"] == TOK.eos_id == 100265
    assert special["<|dummy_85|>"] == TOK.pad_id == 100349
    assert special["<|endofprompt|>"] == 100276 and special["<|dummy_4|>"] == 100267
    assert sorted(special.values()) == list(range(100256, 100352))  # 96 ids, no gaps
    assert TOK.vocab_size == 100352


def test_documents_treat_special_strings_as_text():
    ids = TOK.tokenize("a <|endoftext|> b")
    assert TOK.eod_id not in ids and TOK.decode(ids) == "a <|endoftext|> b"


# ----------------------------------------------------------------------------- fixtures

def preprocess(tmp: Path, name: str, texts) -> str:
    """Preprocess ``texts`` into ``tmp/name.{bin,idx,meta.json}``; return the prefix."""
    from megaphi.data.preprocess import preprocess as run

    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run([str(src)], str(tmp / name), TOK, workers=1)
    return str(tmp / name)


def write_indexed(prefix: Path, lengths) -> str:
    """An indexed dataset with documents of exactly these token lengths (for report figures)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for n in lengths:
        builder.add_document(np.arange(n, dtype=np.int32) % 1000, [n])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


SHARES = {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.40, "code": 0.20, "acquired": 0.10}


@pytest.fixture(scope="module")
def phi4_mix(tmp_path_factory):
    """The Phi-4 mixture over five small real-tokenised sources (two prefixes for code)."""
    tmp = tmp_path_factory.mktemp("mix")
    words = "the quick brown fox jumps over a lazy dog while numbers 12345 follow".split()
    rng = np.random.default_rng(0)

    def docs(n):
        return [" ".join(rng.choice(words, size=int(rng.integers(20, 300)))) for _ in range(n)]

    lines = ["train:"]
    for source, share in SHARES.items():
        names = [f"{source}_a", f"{source}_b"] if source == "code" else [source]
        for name in names:
            preprocess(tmp, name, docs(40))
        lines.append(f"  {source}: {{weight: {share}, prefixes: [{', '.join(names)}]}}")
    lines += ["valid:", "  web: {weight: 1.0, prefixes: [web]}"]
    path = tmp / "mix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(mixture_path, samples, seq=64, cache=None):
    from megaphi.data.datasets import build_gpt_datasets

    return build_gpt_datasets(load_mixture(str(mixture_path)), TOK, seq_length=seq, seed=1234,
                              samples=samples, cache_dir=cache, model_vocab_size=100352)


# ----------------------------------------------------------------------------- mixtures

def test_blended_sampling_matches_the_weights(phi4_mix, tmp_path):
    train, valid, _ = build(phi4_mix, [10_000, 100, 0], cache=str(tmp_path / "cache"))
    mixture = load_mixture(str(phi4_mix))
    source_of = mixture.dataset_sources("train")
    counts = {s: 0 for s in SHARES}
    for i in range(10_000):
        counts[source_of[int(train[i]["dataset_id"])]] += 1
    for source, share in SHARES.items():
        assert abs(counts[source] / 10_000 - share) <= 0.01, (source, counts)
    assert valid is not None and len(valid) >= 100
    sample = train[0]
    assert sample["tokens"].shape == (64,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert list((tmp_path / "cache").iterdir())  # index caches were written there


def test_within_source_weights_follow_tokens(phi4_mix):
    from megaphi.data.mixture import dataset_tokens

    mixture = load_mixture(str(phi4_mix))
    prefixes, weights = mixture.blend("train")
    a, b = (prefixes.index(p) for p in prefixes if Path(p).name.startswith("code_"))
    ta, tb = dataset_tokens(prefixes[a]), dataset_tokens(prefixes[b])
    assert weights[a] / weights[b] == pytest.approx(ta / tb)
    assert weights[a] + weights[b] == pytest.approx(0.20)
    assert sum(weights) == pytest.approx(1.0)


def test_mixture_errors_name_the_entry(tmp_path):
    write_indexed(tmp_path / "a", [10])
    cases = {
        "train:\n  web: {weight: 1, prefixes: [missing]}\n": "missing.bin' does not exist",
        "train:\n  web: {weight: -1, prefixes: [a]}\n": "train.web.weight",
        "train:\n  web: {weight: 1}\n": "train.web.prefixes",
        "training:\n  web: {weight: 1, prefixes: [a]}\n": "needs a top-level 'train:'",
        "train:\n  web: {weight: 1, prefixes: [{prefix: a, weight: 1}, a]}\n": "to every prefix",
    }
    for text, words in cases.items():
        path = tmp_path / "m.yaml"
        path.write_text(text)
        with pytest.raises(MixtureError, match=words.replace("[", r"\[")):
            load_mixture(str(path))
    with pytest.raises(MixtureError, match="does not exist"):
        load_mixture(str(tmp_path / "nope.yaml"))


def test_datasets_from_another_tokenizer_are_refused(phi4_mix, tmp_path):
    from megaphi.data.datasets import check_datasets_tokenizer

    prefix = load_mixture(str(phi4_mix)).blend("train")[0][0]

    class Other:
        name, vocab_size, fingerprint = "other", 100352, "0000000000000000"

    with pytest.raises(ValueError, match="re-run tools/preprocess_data.py"):
        check_datasets_tokenizer([prefix], Other(), 100352)
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_datasets_tokenizer([prefix], TOK, 50000)


# ----------------------------------------------------------------------------- loader

def global_batches(dataset, consumed, steps, gbs, mbs, dp):
    """The samples each global batch holds, gathered over all data-parallel ranks."""
    loaders = [iter(build_loader(dataset, consumed, mbs, r, dp, num_workers=0)) for r in range(dp)]
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(gbs // (mbs * dp)):
            for it in loaders:
                rows.append(next(it)["tokens"])
        out.append(torch.cat(rows))
    return out


def test_loader_resume_is_exact_also_across_dp_sizes(phi4_mix):
    train, _, _ = build(phi4_mix, [400, 0, 0])
    gbs, mbs = 8, 2
    straight = global_batches(train, 0, 10, gbs, mbs, dp=1)
    resumed = global_batches(train, 5 * gbs, 5, gbs, mbs, dp=1)
    for a, b in zip(straight[5:], resumed):
        assert torch.equal(a, b)
    resumed_dp2 = global_batches(train, 5 * gbs, 5, gbs, mbs, dp=2)
    for a, b in zip(straight[5:], resumed_dp2):  # same samples, split over two ranks
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
    assert not torch.equal(straight[0], straight[1])


def test_sampler_shards_without_overlap():
    parts = [list(PretrainingSampler(24, 8, 2, r, 2)) for r in range(2)]
    assert parts[0][0] == [8, 9] and parts[1][0] == [10, 11]
    flat = sorted(i for p in parts for b in p for i in b)
    assert flat == list(range(8, 24))
    with pytest.raises(ValueError, match="train.iters grew"):
        PretrainingSampler(10, 12, 2, 0, 1)


# ----------------------------------------------------------------------------- report

def test_mix_report_figures_match_hand_computed(tmp_path):
    write_indexed(tmp_path / "a1", [100, 300])  # source a: 400 + 600 = 1,000 tokens
    write_indexed(tmp_path / "a2", [600])
    write_indexed(tmp_path / "b", [1000, 2000])  # source b: 3,000 tokens
    (tmp_path / "m.yaml").write_text("train:\n  a: {weight: 1, prefixes: [a1, a2]}\n"
                                     "  b: {weight: 3, prefixes: [b]}\n")
    rows = {r.name: r for r in mixture_report(load_mixture(str(tmp_path / "m.yaml")), 12_000)}
    assert rows["a"].share == 0.25 and rows["b"].share == 0.75
    assert (rows["a"].unique_tokens, rows["b"].unique_tokens) == (1000, 3000)
    assert (rows["a"].allocated_tokens, rows["b"].allocated_tokens) == (3000, 9000)
    assert (rows["a"].epochs, rows["b"].epochs) == (3.0, 3.0)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "data_mix_report.py"),
                           str(tmp_path / "m.yaml"), "--train-tokens", "12K", "--max-epochs", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "25.0%" in proc.stdout and "3.00" in proc.stdout
    assert "repeated 3.0 times" in proc.stderr


def test_token_counts_parse():
    assert parse_token_count("10T") == 1e13 and parse_token_count("250B") == 2.5e11
    assert parse_token_count("1e9") == 1e9
    with pytest.raises(ValueError, match="10T"):
        parse_token_count("lots")


def test_dali_loader_yields_the_torch_loaders_batches(phi4_mix):
    pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    from megaphi.data.dali_loader import DaliLoader

    train, _, _ = build(phi4_mix, [64, 0, 0])
    for rank in range(2):  # resumed at sample 16, data-parallel rank `rank` of 2
        torch_batches = list(build_loader(train, 16, 4, rank, 2, num_workers=0))
        dali_batches = list(DaliLoader(train, 16, 4, rank, 2, num_threads=1))
        assert len(dali_batches) == len(torch_batches) == (64 - 16) // 8
        for a, b in zip(torch_batches, dali_batches):
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert b[key].dtype == a[key].dtype and torch.equal(a[key], b[key]), key


def test_hugging_face_tokenizer_directory(tmp_path):
    """A local HF tokenizer directory tokenises documents, and its datasets record it, so a run
    with the Phi-4 tokenizer refuses them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megaphi.data.datasets import check_datasets_tokenizer
    from megaphi.data.preprocess import preprocess as run, read_meta
    from megaphi.data.tokenizer import load_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "hf")
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert tok.eod_id == 0 and tok.vocab_size < 400
    texts = ["the lazy fox", "a quick <|endoftext|> dog"]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run([str(src)], str(tmp_path / "d"), tok, workers=1)
    ds = IndexedDataset(str(tmp_path / "d"))
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod_id]
    assert tok.eod_id not in tok.tokenize(texts[1])  # special strings in documents are text
    assert read_meta(str(tmp_path / "d"))["tokenizer"]["fingerprint"] == tok.fingerprint
    with pytest.raises(ValueError, match="tokenised with hf:hf"):
        check_datasets_tokenizer([str(tmp_path / "d")], TOK, 100352)
    with pytest.raises(ValueError, match="neither 'phi4' nor"):
        load_tokenizer(str(tmp_path / "missing"))
