"""The inference API and megaphi-generate against transformers' generate, on an imported model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import worker_env
from hf_models import EOS, build_hf_model, load_hf, token_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("hf") / "phi3", seed=5)


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    from megaphi.hf.convert import import_hf_checkpoint

    return import_hf_checkpoint(str(hf_dir), str(tmp_path_factory.mktemp("ckpt") / "ckpt"))


@pytest.fixture(scope="module")
def model(ckpt):
    from megaphi.inference import InferenceModel

    with InferenceModel.from_checkpoint(ckpt) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return load_hf(hf_dir)


def hf_greedy(hf_model, prompt, new_tokens):
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("length", [1, 7, 19])
def test_greedy_matches_transformers_generate(model, hf_model, length):
    prompt = token_batch(1, length, seed=length)[0].tolist()
    want, want_lp = hf_greedy(hf_model, prompt, 24)
    (got,) = model.generate(prompt, max_new_tokens=24)
    assert got.token_ids == want
    assert got.finish_reason == "length"
    assert max(abs(a - b) for a, b in zip(got.logprobs, want_lp)) <= 1e-4
    assert len(set(want)) > 5  # not a degenerate repetition: the cached steps matter


def test_kv_cache_matches_full_forward_when_sampling(model):
    """Sampled continuations (a batch of 3 on one cache): each token's log-probability from the
    cached decode equals the one from a full forward pass without cache."""
    prompt = token_batch(1, 9, seed=11)[0].tolist()
    outs = model.generate(prompt, max_new_tokens=12, temperature=1.0, seed=3, num_samples=3)
    assert len({tuple(o.token_ids) for o in outs}) == 3
    for out in outs:
        full = torch.log_softmax(model.logits(prompt + out.token_ids), dim=-1)
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(out.token_ids))
        want = [full[p, t].item() for p, t in zip(positions, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(out.logprobs, want)) <= 1e-4


def test_sampling_is_seeded(model):
    prompt = token_batch(1, 5, seed=2)[0].tolist()
    first = model.generate(prompt, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    again = model.generate(prompt, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    other = model.generate(prompt, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=8)
    assert first[0].token_ids == again[0].token_ids != other[0].token_ids
    (greedy,) = model.generate(prompt, max_new_tokens=8)
    (nucleus_of_one,) = model.generate(prompt, max_new_tokens=8, temperature=1.0, top_p=1e-9,
                                       seed=1)
    assert nucleus_of_one.token_ids == greedy.token_ids


def test_stop_tokens_end_a_sample(model):
    prompt = token_batch(1, 6, seed=4)[0].tolist()
    (free,) = model.generate(prompt, max_new_tokens=16)
    k = next(i for i in range(3, 16) if free.token_ids[i] not in free.token_ids[:i])
    (stopped,) = model.generate(prompt, max_new_tokens=16, stop_ids=[free.token_ids[k], -5])
    assert stopped.token_ids == free.token_ids[:k + 1] and stopped.finish_reason == "stop"


def test_top_p_and_temperature_sampling_distribution():
    from megaphi.inference import sample_next, top_p_filter

    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().unsqueeze(0)
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 <= 0.85
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False, False]
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(40000, -1), temperature=1.0, top_p=0.8, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=0.01)
    assert draws.max().item() == 2  # a token outside the nucleus is never drawn
    sharp = sample_next(logits.expand(40000, -1), temperature=0.5, top_p=1.0, generator=gen)
    want = probs ** 2 / (probs ** 2).sum()
    assert torch.allclose(torch.bincount(sharp, minlength=5).float() / 40000, want, atol=0.01)
    assert sample_next(logits, temperature=0.0, top_p=0.1, generator=None).tolist() == [0]


def test_logits_rejects_bad_ids(model):
    with pytest.raises(ValueError, match="token ids must be in"):
        model.logits([1, 100352])
    with pytest.raises(ValueError, match="model.seq_length"):
        model.generate([1] * 250, max_new_tokens=10)


@pytest.fixture(scope="module")
def im_end_ckpt(tmp_path_factory):
    """A model rewired to always predict <|im_end|> (transformers agrees)."""
    from megaphi.hf.convert import import_hf_checkpoint

    tmp = tmp_path_factory.mktemp("im_end")
    hf_dir = build_hf_model(tmp / "hf", num_layers=2, force_token=EOS)
    out = load_hf(hf_dir).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False)
    assert out[0, -1].item() == EOS
    return import_hf_checkpoint(str(hf_dir), str(tmp / "ckpt"))


def test_chat_applies_the_template_and_stops_at_im_end(im_end_ckpt):
    from megaphi.data.tokenizer import Phi4Tokenizer
    from megaphi.generate import generate_text
    from megaphi.inference import InferenceModel

    with InferenceModel.from_checkpoint(im_end_ckpt) as model:
        result = generate_text(model, "Hi", chat=True, system="Be brief.", max_new_tokens=20)
    assert result["prompt_token_ids"] == Phi4Tokenizer().encode(
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
        "<|im_start|>assistant<|im_sep|>")
    assert result["token_ids"] == [EOS] and result["finish_reason"] == "stop"
    assert result["text"] == ""


def generate_cli(*args):
    return subprocess.run([sys.executable, "-m", "megaphi.generate", *args], capture_output=True,
                          text=True, timeout=300, env=worker_env(), cwd=ROOT)


def test_cli_chat_json(ckpt, model):
    from megaphi.generate import generate_text

    proc = generate_cli("--ckpt", str(ckpt), "--prompt", "Hello, who are you?", "--chat",
                        "--json", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    want = generate_text(model, "Hello, who are you?", chat=True, max_new_tokens=6)
    assert result["token_ids"] == want["token_ids"] and len(result["token_ids"]) == 6
    assert result["text"] == model.tokenizer.decode(result["token_ids"])
    assert result["finish_reason"] == "length"
    assert result["prompt_token_ids"][:3] == [100264, 882, 100266]  # <|im_start|>user<|im_sep|>


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "/nonexistent/run"], "does not exist"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--system", "S"], "--system applies to --chat"),
    (["--max-new-tokens", "300"], "exceed the model's context of 256 tokens"),
])
def test_cli_errors_exit_2_with_one_message(ckpt, args, message):
    base = {"--ckpt": str(ckpt), "--prompt": "x"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    proc = generate_cli(*[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stop_ids_come_from_the_tokenizer(char_tokenizer):
    """A chat turn ends at the tokenizer's own <|im_end|>, whatever its id (the character-level
    tokenizer's is 100, not Phi-4's 100265); a plain prompt also at the end of document."""
    from megaphi.data.tokenizer import Phi4Tokenizer, load_tokenizer
    from megaphi.generate import stop_ids

    char = load_tokenizer(str(char_tokenizer))
    vocab = json.loads((Path(char_tokenizer) / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert stop_ids(char, chat=True) == [ids["<|im_end|>"]]
    assert stop_ids(char, chat=False) == sorted({ids["<|im_end|>"], ids["<|endoftext|>"]})
    assert stop_ids(Phi4Tokenizer(), chat=True) == [100265]
