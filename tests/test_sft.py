"""Post-training, part 1: the phase-generic trainer, the exact token-weighted loss, packed SFT on
Phi-4 chat data, and ``megaphi-eval`` (CPU, gloo, fp32).

References are independent of megaphi's own loss code: transformers' ``Phi3ForCausalLM`` with
labels -100 outside the assistant spans (the spans found with transformers' chat template),
the documents of a packed row run alone, and per-token losses averaged by hand.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import eval_json, logged_losses, run_worker, torchrun, worker_env
from hf_models import build_hf_model, load_hf

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "chat"


# ---------------------------------------------------------------------------------------------
# Packing (unit)


def test_packing_is_deterministic_and_dense():
    from megaphi.data.packing import pack

    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 900, size=500)
    rows = pack(sizes, 1024, seed=[1234, 0])
    assert [r.tolist() for r in rows] == [r.tolist() for r in pack(sizes, 1024, seed=[1234, 0])]
    assert [r.tolist() for r in rows] != [r.tolist() for r in pack(sizes, 1024, seed=[1234, 1])]
    flat = np.concatenate(rows)
    assert sorted(flat.tolist()) == list(range(500))  # every segment exactly once
    assert max(sizes[r].sum() for r in rows) <= 1024
    assert len(rows) <= 1.05 * np.ceil(sizes.sum() / 1024)  # near the lower bound


def test_packed_rows_restart_positions_and_mask_only_assistant_tokens(chat_mixture):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaphi.data.packing import ChatSegments, PackedRows
    from megaphi.data.tokenizer import Phi4Tokenizer

    prefix = str(chat_mixture.parent / "faq_train")
    tok = Phi4Tokenizer()
    rows = PackedRows(ChatSegments(prefix, tok, 1024), 1024, seed=5, num_samples=60)
    docs = IndexedDataset(prefix)
    for i in (0, 17, 59):  # 59: second epoch
        row = rows[i]
        seq = row["seq_ids"]
        for j, k in enumerate(rows.row_segments(i).tolist()):
            at = (seq == j).nonzero().flatten()
            ids = docs[int(rows.segments.index[k])].tolist()
            assert ids[-1] == tok.eod_id  # the separator is never an input or a label
            assert row["tokens"][at].tolist() == ids[:-2]
            assert row["labels"][at].tolist() == ids[1:-1]
            assert row["position_ids"][at].tolist() == list(range(len(at)))
            text = tok.decode(row["labels"][at][row["loss_mask"][at] > 0].tolist())
            assert "<|im_start|>" not in text and "<|im_sep|>" not in text
            assert text.endswith("<|im_end|>")
        assert row["loss_mask"][seq < 0].sum() == 0
    assert rows.stats.efficiency(1024) > 0.95


def test_text_windows_predict_every_token_but_each_documents_first_once(sample_mixture):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaphi.data.packing import PackedRows, TextSegments

    prefix = str(sample_mixture.parent / "web")
    docs = IndexedDataset(prefix)
    windows = TextSegments(prefix, 512)
    assert windows.sizes.sum() == docs.sequence_lengths.sum() - len(docs)
    rows = PackedRows(windows, 512, seed=0, shuffle=False)  # one epoch, as megaphi-eval reads
    labels = {}
    for i in range(len(rows)):
        row = rows[i]
        for j, k in enumerate(rows.row_segments(i).tolist()):
            doc, start = windows.windows[:, k].tolist()
            at = row["seq_ids"] == j
            labels[(doc, start)] = row["labels"][at].tolist()
            assert row["loss_mask"][at].all()
    for doc in (0, 7, len(docs) - 1):
        got = [t for (d, s), ids in sorted(labels.items()) if d == doc for t in ids]
        assert got == docs[doc].tolist()[1:]


def test_sft_mixture_blends_chat_datasets_by_weight(chat_mixture):
    from megaphi.data.packing import BlendedRows, ChatSegments, PackedRows, build_packed_rows
    from megaphi.data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    prefixes = [str(chat_mixture.parent / "faq_train"), str(chat_mixture.parent / "faq_valid")]
    rows = build_packed_rows((prefixes, [3.0, 1.0]), lambda i, p, n: PackedRows(
        ChatSegments(p, tok, 512), 512, seed=1 + i, num_samples=n, pad_id=tok.pad_id), 40)
    assert isinstance(rows, BlendedRows) and len(rows) == 40
    assert np.bincount(rows.dataset_index).tolist() == [30, 10]
    valid = rows.datasets[1]
    assert len(valid) >= 10 and valid.stats.rows < 10  # the small set repeats, epoch by epoch
    for i in np.flatnonzero(rows.dataset_index == 1)[:3].tolist():
        assert torch.equal(rows[i]["tokens"], valid[int(rows.sample_index[i])]["tokens"])


def test_overlong_conversations_are_dropped_or_truncated(chat_mixture):
    from megaphi.data.packing import ChatSegments
    from megaphi.data.tokenizer import Phi4Tokenizer

    tok, prefix = Phi4Tokenizer(), str(chat_mixture.parent / "faq_train")
    dropped = ChatSegments(prefix, tok, 256)
    cut = ChatSegments(prefix, tok, 256, truncate=True)
    assert dropped.dropped == cut.truncated > 10 and cut.dropped == 0
    assert len(dropped.sizes) + dropped.dropped == len(cut.sizes) == 160
    assert cut.sizes.max() == 256 and dropped.sizes.max() <= 256
    ids, mask = cut.get(int(np.argmax(cut.sizes)))
    assert len(ids) == 257 and mask[-1] == 1  # cut inside the answer, which keeps its loss


# ---------------------------------------------------------------------------------------------
# Token weighting


@pytest.fixture(scope="module")
def token_weighting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tw")
    dp1 = run_worker("token_weight_worker.py", 1, tmp / "dp1.pt", args=["8", "1", "4"])
    dp2 = run_worker("token_weight_worker.py", 2, tmp / "dp2.pt", args=["1", "4"])
    return dp1, dp2


def test_loss_is_token_weighted_over_the_global_batch(token_weighting):
    dp1, dp2 = token_weighting
    per_token, mask = dp1["per_token"].double(), dp1["loss_mask"].double()
    weighted = float((per_token * mask).sum() / mask.sum())
    mean_of_rows = float(((per_token * mask).sum(1) / mask.sum(1)).mean())
    assert abs(weighted - mean_of_rows) > 1e-2  # the batch tells the two apart
    assert dp1[8]["tokens"] == mask.sum() == 114
    for result, mbs in [(dp1, 8), (dp1, 1), (dp1, 4), (dp2, 1), (dp2, 4)]:
        assert result[mbs]["loss"] == pytest.approx(weighted, rel=1e-6, abs=0), mbs
        assert result[mbs]["tokens"] == 114


def test_gradients_do_not_depend_on_micro_batches_or_dp(token_weighting):
    dp1, dp2 = token_weighting
    reference = dp1[8]["grads"]  # one micro-batch holding the whole global batch
    for result, mbs in [(dp1, 1), (dp1, 4), (dp2, 1), (dp2, 4)]:
        grads = result[mbs]["grads"]
        for name, ref in reference.items():
            scale = ref.abs().max().item()
            assert (grads[name] - ref).abs().max().item() <= 1e-6 * max(scale, 1e-3), (mbs, name)


GOLDEN_DEMO = [11.534701347351074, 11.563130855560303, 11.545687198638916, 11.532865047454834,
               11.519606113433838, 11.519172191619873, 11.497948169708252, 11.44908857345581,
               11.425201892852783, 11.356657981872559]
"""Steps 1-10 of ``examples/tiny_demo.yaml`` (TP=2), logged by the trainer before losses were
token-weighted (mean per micro-batch, then over micro-batches and DP)."""


def test_pretraining_demo_losses_are_unchanged(tmp_path):
    """``examples/tiny_demo.yaml`` on its mixture (the shipped sample corpus, preprocessed here
    as run_demo.sh does), steps 1-10."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    for source in ("web", "web_rewrites", "synthetic", "code", "acquired"):
        preprocess([str(ROOT / "examples" / "data" / "sample" / f"{source}.jsonl")],
                   str(tmp_path / "data" / "sample" / source), Phi4Tokenizer(), workers=1)
    mixture = tmp_path / "mixture.yaml"  # its prefixes are relative to the file
    mixture.write_text((ROOT / "examples" / "phi4_pretrain_mixture.yaml").read_text())
    cmd = torchrun(2, "-m", "megaphi.train", "--config", "examples/tiny_demo.yaml",
                   f"data.mixture={mixture}", "train.iters=10", "schedule.decay_iters=300",
                   "train.log_interval=1", f"train.run_dir={tmp_path / 'run'}",
                   "logging.tensorboard=false", "checkpoint.keep_last=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=worker_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_losses(tmp_path / "run") == pytest.approx(GOLDEN_DEMO, rel=1e-6, abs=0)


# ---------------------------------------------------------------------------------------------
# No leakage between packed documents


@pytest.mark.parametrize("layout,nproc", [
    (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    (["parallel.pp=4"], 4),
], ids=["tp2-sp", "pp4"])
def test_packed_documents_do_not_see_each_other(tmp_path, layout, nproc):
    result = run_worker("packed_worker.py", nproc, tmp_path / "out.pt", args=layout)
    packed, seq_ids = result["packed"], result["seq_ids"]
    for j, alone in enumerate(result["alone"]):
        mine = packed[seq_ids == j]
        assert alone.std() > 0.5  # per-token losses differ: a wrong mask would show
        torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# megaphi-eval against transformers


@pytest.fixture(scope="module")
def hf_import(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_sft")
    hf_dir = build_hf_model(tmp / "phi3")
    out = tmp / "ckpt"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"),
                           "import", "--hf-dir", str(hf_dir), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=worker_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return hf_dir, out


def transformers_chat_loss(hf_dir: Path, jsonl: Path):
    """Token-weighted masked cross-entropy of transformers' model over every conversation,
    one conversation at a time; the assistant spans come from transformers' chat template."""
    from transformers import PreTrainedTokenizerFast

    from megaphi.hf.tokenizer import PHI4_CHAT_TEMPLATE, build_phi4_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=build_phi4_tokenizer(),
                                  chat_template=PHI4_CHAT_TEMPLATE)
    model = load_hf(hf_dir)
    header = tok.encode("<|im_start|>assistant<|im_sep|>", add_special_tokens=False)

    def template_ids(messages):
        if not messages:
            return []
        out = tok.apply_chat_template(messages, tokenize=True)
        return list(out["input_ids"]) if hasattr(out, "keys") else list(out)

    total, count = 0.0, 0
    for line in jsonl.read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids = template_ids(messages)
        labels = [-100] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, upto = template_ids(messages[:i]), template_ids(messages[:i + 1])
            for p in range(len(before) + len(header), len(upto)):
                labels[p] = ids[p]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        target = torch.tensor(labels[1:])
        total += torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100,
                                                   reduction="sum").item()
        count += int((target != -100).sum())
    return total / count, count


@pytest.mark.parametrize("layout,nproc", [([], 1), (["parallel.tp=2"], 2), (["parallel.pp=2"], 2)],
                         ids=["tp1", "tp2", "pp2"])
def test_eval_chat_loss_matches_transformers(hf_import, chat_mixture, layout, nproc):
    hf_dir, ckpt = hf_import
    want, tokens = transformers_chat_loss(hf_dir, CHAT / "faq_valid.jsonl")
    got = eval_json(nproc, ckpt, chat_mixture.parent / "faq_valid", "model.seq_length=1024",
                    "train.micro_batch_size=2", *layout)
    assert got["kind"] == "chat" and got["dropped"] == 0
    assert got["tokens"] == tokens
    assert got["loss"] == pytest.approx(want, rel=1e-5, abs=0)
    assert got["rows"] < got["documents"]  # packed


# ---------------------------------------------------------------------------------------------
# Refusals


def train_cli(*args) -> subprocess.CompletedProcess:
    """``megaphi-train --preset tiny ARGS`` in one process (refusals come before any launch)."""
    return subprocess.run([sys.executable, "-m", "megaphi.train", "--preset", "tiny", *args],
                          capture_output=True, text=True, timeout=300, env=worker_env(), cwd=ROOT)


def test_sft_without_a_starting_checkpoint_is_refused():
    from megaphi.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"checkpoint.load: phase.name=sft"):
        load_config("tiny", overrides=["phase.name=sft"])
    proc = train_cli("phase.name=sft", "--dry-run")
    assert proc.returncode == 2 and "checkpoint.load" in proc.stderr and "Fix:" in proc.stderr


def test_datasets_of_the_wrong_kind_are_refused_naming_the_field(sample_mixture, chat_mixture,
                                                                  tmp_path):
    from megaphi.config import ConfigError, load_config
    from megaphi.phases import get_phase
    from megaphi.phases.run import load_run_mixture

    sft = load_config("tiny", overrides=["phase.name=sft", f"checkpoint.load={tmp_path}",
                                         f"data.mixture={sample_mixture}"])
    with pytest.raises(ConfigError, match=r"^data.mixture: .*(web|code) holds text .* phase.name=sft "
                                          r"trains on chat"):
        load_run_mixture(sft, get_phase(sft))
    pre = load_config("tiny", overrides=[f"data.mixture={chat_mixture}"])
    with pytest.raises(ConfigError, match=r"^data.mixture: .*faq_train holds chat .* "
                                          r"phase.name=pretrain trains on text"):
        load_run_mixture(pre, get_phase(pre))
    proc = train_cli(f"data.mixture={chat_mixture}", f"train.run_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "data.mixture" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
