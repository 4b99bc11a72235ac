"""Tiny random Hugging Face Phi-3 models for the interop tests, built locally (no downloads)."""

import glob
from pathlib import Path

import torch

VOCAB = 100352  # Phi-4's, so the real tokenizer and chat template work
EOS = 100265


def build_hf_model(out_dir: Path, *, num_layers: int = 4, kv_heads: int = 2,
                   dtype: torch.dtype = torch.float32, seed: int = 0,
                   force_token: int = None, max_shard_size: str = "20MB") -> Path:
    """Save a random ``Phi3ForCausalLM`` with GQA (8 query heads, ``kv_heads`` KV heads, width
    128, FFN 384), RoPE base 25,000 and RMSNorm eps 1e-6 (both unlike megaphi's defaults, so a
    conversion that drops them shows), as several safetensors shards with an index.

    Every weight is random, norms included (1 + 0.1 N(0, 1)), with matrices ~ N(0, 1/fan_in) so
    logits are O(1). ``force_token`` rewires the model to always predict that token: residual
    dimension 0 carries a constant +10 that no layer writes to, the final norm keeps only that
    dimension, and only ``force_token``'s output row reads it.
    """
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=kv_heads, rope_theta=25000.0,
        rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=100257, eos_token_id=EOS,
        pad_token_id=100349, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5)
        if force_token is not None:
            _force(model, force_token)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    return Path(out_dir)


def _force(model, token: int) -> None:
    inner = model.model
    inner.embed_tokens.weight[:, 0] = 10.0
    for layer in inner.layers:
        layer.self_attn.o_proj.weight[0, :] = 0.0
        layer.mlp.down_proj.weight[0, :] = 0.0
    inner.norm.weight.zero_()
    inner.norm.weight[0] = 1.0
    model.lm_head.weight.zero_()
    model.lm_head.weight[token, 0] = 1.0


def load_hf(hf_dir: Path):
    """The saved model in fp32 with eager attention, in eval mode (the reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def hf_tensors(hf_dir: Path) -> dict:
    """Every tensor of a safetensors directory, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(str(Path(hf_dir) / "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def token_batch(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
