"""Preference pairs for DPO: parsing JSON lines, and reading the preprocessed dataset.

A pair is one JSON object per line, of one of two kinds (a file may mix them):

* **Full-length pair**: ``{"prompt": [messages], "chosen": "...", "rejected": "..."}``. ``prompt``
  is a list of chat messages as in SFT (:mod:`megaphi.data.chat`) that ends with a user turn.
  ``chosen`` and ``rejected`` are the assistant's text, or TRL's conversational form, a list
  holding exactly one assistant message ``[{"role": "assistant", "content": "..."}]``.
* **Token pair** (Pivotal Token Search): ``{"prompt": [messages], "prefix_ids": [int, ...],
  "chosen_token_id": int, "rejected_token_id": int}``. The context is the rendered prompt, the
  assistant header ``<|im_start|>assistant<|im_sep|>`` and then ``prefix_ids`` taken as token
  ids, never re-tokenised (re-tokenising prompt + token can merge tokens). Every id must lie in
  the tokenizer's vocabulary, and the two tokens must differ.

Any other field of the object (``"id"``, ``"source"``, ``"p_before"``...) is metadata: it
passes through to the sidecar ``PREFIX.extra.jsonl``, one JSON object per pair in order.

Storage (``tools/preprocess_data.py --format preference``; the contract the DPO trainer reads):
one document per pair, no end-of-document token, made of

* full pair, 3 sequences: ``prompt_ids`` (:func:`~megaphi.data.chat.render_chat` of the prompt
  plus the assistant header), ``chosen_ids`` and ``rejected_ids`` (the response's content
  tokens, ``tokenizer.tokenize``, then ``<|im_end|>``): the tokens the response is scored on;
* token pair, 2 sequences: ``context_ids`` (rendered prompt + assistant header + ``prefix_ids``)
  and ``[chosen_token_id, rejected_token_id]``.

:func:`parse_pair` validates and tokenises one pair; :class:`PreferencePairs` reads a dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from megaphi.data.chat import ChatFormatError, _type_name, chat_token_ids, parse_messages, \
    render_chat
from megaphi.data.packing import Segments

FULL = 0
"""Kind of a full-length pair (3 sequences: prompt, chosen, rejected)."""
TOKEN = 1
"""Kind of a token pair (2 sequences: context, [chosen id, rejected id])."""
PAIR_KEYS = ("prompt", "chosen", "rejected", "prefix_ids", "chosen_token_id",
             "rejected_token_id")
"""The keys a pair's object may use for the pair itself; every other key is metadata."""
_FULL_KEYS = ("chosen", "rejected")
_TOKEN_KEYS = ("prefix_ids", "chosen_token_id", "rejected_token_id")

PAIR_FORMAT = ('{"prompt": [messages ending with a user turn], "chosen": "...", "rejected": '
               '"..."} (or chosen/rejected as [{"role": "assistant", "content": "..."}]), or '
               '{"prompt": [...], "prefix_ids": [ids], "chosen_token_id": id, '
               '"rejected_token_id": id}')
"""What a pair must look like, for error messages."""
EXTRA_SUFFIX = ".extra.jsonl"
"""The metadata sidecar of a preference dataset: ``PREFIX.extra.jsonl``."""


def extra_path(prefix) -> str:
    """``PREFIX.extra.jsonl``: one JSON object of metadata per pair, in document order."""
    return os.fspath(prefix) + EXTRA_SUFFIX


def _error(reason: str) -> ChatFormatError:
    return ChatFormatError(reason, f"a pair is {PAIR_FORMAT}")


def parse_pair(obj: Any, tokenizer) -> Tuple[int, List[List[int]]]:
    """Validate one decoded JSON line as a preference pair and tokenise it.

    Args:
        obj: the value of one JSON line (``json.loads``).
        tokenizer: a tokenizer with Phi-4's chat special tokens (``tokenize``, ``encode``,
            ``vocab_size``; see :func:`megaphi.data.chat.chat_token_ids`).

    Returns:
        ``(kind, sequences)``: :data:`FULL` and ``[prompt_ids, chosen_ids, rejected_ids]``, or
        :data:`TOKEN` and ``[context_ids, [chosen_token_id, rejected_token_id]]`` (see the
        module docstring for what each holds).

    Raises:
        ChatFormatError: the value is not a valid pair; :attr:`ChatFormatError.reason` says
            precisely why (e.g. ``"prompt must end with a user turn, ends with assistant"``,
            ``"chosen_token_id 100400 is outside the vocabulary of 100352"``).
    """
    if not isinstance(obj, dict):
        raise _error(f"the pair is {_type_name(obj)}, not a JSON object")
    has_full = [k for k in _FULL_KEYS if k in obj]
    has_token = [k for k in _TOKEN_KEYS if k in obj]
    if not has_full and not has_token:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise _error("has neither chosen/rejected nor prefix_ids/chosen_token_id/"
                     f"rejected_token_id (keys: {keys})")
    if has_full and has_token:
        raise _error(f"has both {'/'.join(has_full)} (a full-length pair) and "
                     f"{'/'.join(has_token)} (a token pair); a pair is one kind")
    special = chat_token_ids(tokenizer)
    prompt_ids = _prompt_ids(obj, tokenizer) + list(special.headers["assistant"])
    if has_full:
        missing = [k for k in _FULL_KEYS if k not in obj]
        if missing:
            raise _error(f"has {has_full[0]!r} but no {missing[0]!r}")
        chosen, rejected = (_response_text(obj[k], k) for k in _FULL_KEYS)
        if chosen == rejected:
            raise _error("chosen and rejected are the same text; a pair needs two different "
                         "responses")
        return FULL, [prompt_ids,
                      [*map(int, tokenizer.tokenize(chosen)), special.im_end],
                      [*map(int, tokenizer.tokenize(rejected)), special.im_end]]
    missing = [k for k in _TOKEN_KEYS if k not in obj]
    if missing:
        raise _error(f"a token pair needs prefix_ids, chosen_token_id and rejected_token_id; "
                     f"{', '.join(missing)} missing")
    vocab = int(tokenizer.vocab_size)
    prefix = obj["prefix_ids"]
    if not isinstance(prefix, list):
        raise _error(f"prefix_ids is {_type_name(prefix)}, not an array of token ids")
    for index, token in enumerate(prefix):
        _check_id(token, f"prefix_ids[{index}]", vocab)
    chosen_id, rejected_id = (_check_id(obj[k], k, vocab)
                              for k in ("chosen_token_id", "rejected_token_id"))
    if chosen_id == rejected_id:
        raise _error(f"chosen_token_id and rejected_token_id are both {chosen_id}; a pair needs "
                     "two different tokens")
    return TOKEN, [prompt_ids + [int(t) for t in prefix], [chosen_id, rejected_id]]


def pair_metadata(obj: Dict[str, Any]) -> Dict[str, Any]:
    """The metadata of a pair's object: every field but :data:`PAIR_KEYS`, in order."""
    return {k: v for k, v in obj.items() if k not in PAIR_KEYS}


def _prompt_ids(obj: Dict[str, Any], tokenizer) -> List[int]:
    try:
        messages = parse_messages(obj, "prompt", "prompt", "; it must end with a user turn",
                                  message_label="prompt message")
    except ChatFormatError as e:
        raise _error(e.reason) from None
    if messages[-1]["role"] != "user":
        raise _error(f"prompt must end with a user turn, ends with {messages[-1]['role']}")
    return render_chat(messages, tokenizer)[0]


def _response_text(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        rule = f"{key}: a list must hold exactly one assistant message"
        if len(value) != 1:
            raise _error(f"{rule}, it holds {len(value)}")
        message = value[0]
        if not isinstance(message, dict):
            raise _error(f"{rule}, it holds {_type_name(message)}")
        if message.get("role") != "assistant":
            raise _error(f"{rule}, its message has role {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise _error(f"{key}: the assistant message's content is "
                         f"{_type_name(message.get('content'))}, not a string")
        return message["content"]
    raise _error(f"{key} is {_type_name(value)}, not a string or a list holding one assistant "
                 "message")


def _check_id(value: Any, name: str, vocab: int) -> int:
    if type(value) is not int:  # bool is not an id, nor 3.0
        raise _error(f"{name} is {_type_name(value)} {json.dumps(value)[:20]}, not an integer "
                     "token id")
    if not 0 <= value < vocab:
        raise _error(f"{name} {value} is outside the vocabulary of {vocab}")
    return value


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class FullPair:
    """A full-length pair: the prompt (ending with the assistant header) and two responses
    (content tokens then ``<|im_end|>``, the tokens scored)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


@dataclass(frozen=True)
class TokenPair:
    """A token pair: the context (prompt, assistant header, prefix ids) and the two next tokens."""

    context: np.ndarray
    chosen_id: int
    rejected_id: int


class PreferencePairs:
    """A preference dataset written by ``tools/preprocess_data.py --format preference``.

    ``pairs[i]`` is a :class:`FullPair` or a :class:`TokenPair`. :attr:`kinds` and the length
    arrays come from the index alone (no tokens read), for packing.

    Args:
        prefix: the dataset's prefix (``PREFIX.bin``, ``.idx``, ``.meta.json``,
            ``.extra.jsonl``).

    Raises:
        megaphi.data.preprocess.PreprocessError: not a complete dataset, or not of kind
            ``preference``, or its documents are not 2 or 3 sequences.
    """

    def __init__(self, prefix):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megaphi.data.preprocess import PreprocessError, read_meta

        self.prefix = os.fspath(prefix)
        self.meta = read_meta(self.prefix)
        kind = self.meta.get("kind", "text")
        if kind != "preference":
            raise PreprocessError(f"{self.prefix} holds {kind} data, not preference pairs; "
                                  "preprocess pairs with tools/preprocess_data.py --format "
                                  "preference")
        self._dataset = IndexedDataset(self.prefix)
        docs = np.asarray(self._dataset.document_indices, dtype=np.int64)
        self._first = docs[:-1]
        counts = np.diff(docs)
        if len(counts) and not np.isin(counts, (2, 3)).all():
            bad = int(np.flatnonzero(~np.isin(counts, (2, 3)))[0])
            raise PreprocessError(f"{self.prefix}: pair {bad} has {int(counts[bad])} sequences, "
                                  "not 2 (token pair) or 3 (full pair); preprocess it again")
        self.kinds = np.where(counts == 3, FULL, TOKEN).astype(np.uint8)
        """[pairs] :data:`FULL` (0) or :data:`TOKEN` (1)."""
        lengths = np.asarray(self._dataset.sequence_lengths, dtype=np.int64)
        full = self.kinds == FULL
        self.prompt_lengths = lengths[self._first]
        """[pairs] tokens of the prompt (full pair) or of the context (token pair)."""
        padded = np.concatenate([lengths, np.zeros(2, np.int64)])  # a last token pair's first+2
        self.chosen_lengths = np.where(full, padded[self._first + 1], 0)
        """[pairs] tokens of the chosen response (full pair; 0 for a token pair)."""
        self.rejected_lengths = np.where(full, padded[self._first + 2], 0)
        """[pairs] tokens of the rejected response (full pair; 0 for a token pair)."""
        self._extras: Optional[List[Dict[str, Any]]] = None

    def __len__(self) -> int:
        return len(self.kinds)

    def __getitem__(self, i: int) -> Union[FullPair, TokenPair]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} of {n}")
        i %= n
        first = int(self._first[i])
        if self.kinds[i] == FULL:
            return FullPair(*(np.array(self._dataset[first + k], dtype=np.int64)
                              for k in range(3)))
        context = np.array(self._dataset[first], dtype=np.int64)
        chosen, rejected = (int(t) for t in self._dataset[first + 1])
        return TokenPair(context, chosen, rejected)

    def extra(self, i: int) -> Dict[str, Any]:
        """Pair ``i``'s metadata (the fields of its line other than the pair), ``{}`` if none."""
        if self._extras is None:
            with open(extra_path(self.prefix), encoding="utf-8") as f:
                self._extras = [json.loads(line) for line in f]
        return self._extras[i]


class PairSegments(Segments):
    """The pairs of a preference dataset as the units :class:`~megaphi.data.packing.PackedRows`
    packs into DPO rows, so a pair's chosen and rejected sequences always share a row (and so a
    micro-batch).

    A full pair fills ``2 * prompt + chosen + rejected - 2`` positions: two attention segments,
    prompt + chosen and prompt + rejected, scored on the response tokens. A token pair fills
    ``len(context)`` positions: one segment whose last position's distribution gives both
    next-token log-probs (``labels`` holds the chosen token there, ``rejected_labels`` the
    rejected one). A pair longer than a row is dropped and counted in :attr:`dropped`.

    A row's fields, ``[seq_length]`` each (besides ``position_ids`` and ``seq_ids``):

    * ``tokens``, ``labels`` (next tokens; the chosen token at a token pair's last position)
      and ``rejected_labels`` (the same, but the rejected token there);
    * ``chosen_pair`` / ``rejected_pair``: the row slot of the pair whose chosen / rejected
      log-prob a position adds to (its ``labels`` / ``rejected_labels`` token), -1 elsewhere;
    * per row slot ``j`` (the ``j``-th pair of the row): ``pair_index`` (the pair's number,
      ``first_pair`` plus its index in the dataset; -1 for unused slots) and ``ref_chosen`` /
      ``ref_rejected``, its reference log-probs (0 without ``reference``).

    Args:
        prefix: a preference dataset (``tools/preprocess_data.py --format preference``).
        seq_length: positions per row.
        first_pair: the number of this dataset's first pair among all the run's pairs.
        reference: ``(chosen, rejected)`` summed reference log-probs per pair of the dataset.
    """

    unit = "pairs"

    def __init__(self, prefix, seq_length: int, first_pair: int = 0, reference=None):
        self.pairs = PreferencePairs(prefix)
        self.name, self.first_pair, self.reference = os.fspath(prefix), first_pair, reference
        p = self.pairs.prompt_lengths
        full = self.pairs.kinds == FULL
        sizes = np.where(full, 2 * p + self.pairs.chosen_lengths + self.pairs.rejected_lengths - 2,
                         p)
        self.index = np.flatnonzero((sizes <= seq_length) & (sizes > 0))
        self.sizes = sizes[self.index]
        self.dropped = len(sizes) - len(self.index)

    def kept(self) -> np.ndarray:
        """Indices (in the dataset) of the pairs that fit a row."""
        return self.index

    def empty_row(self, seq_length: int, pad_id: int) -> Dict[str, np.ndarray]:
        def filled(value, dtype=np.int64):
            return np.full(seq_length, value, dtype=dtype)

        return {"tokens": filled(pad_id), "labels": filled(pad_id),
                "rejected_labels": filled(pad_id), "chosen_pair": filled(-1),
                "rejected_pair": filled(-1), "pair_index": filled(-1),
                "ref_chosen": filled(0.0, np.float64), "ref_rejected": filled(0.0, np.float64)}

    def write(self, row: Dict[str, np.ndarray], at: int, k: int, slot: int) -> List[int]:
        i = int(self.index[k])
        pair = self.pairs[i]
        row["pair_index"][slot] = self.first_pair + i
        if self.reference is not None:
            row["ref_chosen"][slot] = self.reference[0][i]
            row["ref_rejected"][slot] = self.reference[1][i]
        if isinstance(pair, TokenPair):
            ids = pair.context
            n = len(ids)
            row["tokens"][at:at + n] = ids
            row["labels"][at:at + n - 1] = ids[1:]
            row["rejected_labels"][at:at + n - 1] = ids[1:]
            row["labels"][at + n - 1] = pair.chosen_id
            row["rejected_labels"][at + n - 1] = pair.rejected_id
            row["chosen_pair"][at + n - 1] = slot
            row["rejected_pair"][at + n - 1] = slot
            return [n]
        lengths = []
        for response, side in ((pair.chosen, "chosen_pair"), (pair.rejected, "rejected_pair")):
            ids = np.concatenate([pair.prompt, response])
            n = len(ids) - 1
            row["tokens"][at:at + n] = ids[:-1]
            row["labels"][at:at + n] = ids[1:]
            row["rejected_labels"][at:at + n] = ids[1:]
            row[side][at + len(pair.prompt) - 1:at + n] = slot  # the response's tokens
            lengths.append(n)
            at += n
        return lengths
