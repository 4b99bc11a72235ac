"""Phi-4's chat format: the one renderer of conversations into token ids and a loss mask.

Phi-4 writes each message as ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>``, with nothing
between messages and no BOS (shared/PHI4.md)::

    <|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>
    <|im_start|>assistant<|im_sep|>Hello!<|im_end|>

Everything that writes this format lives here: :func:`render_chat` (token ids and loss mask, for
SFT data and prompts), :func:`chat_text` (the same as a string, for display and prompts),
:data:`PHI4_CHAT_TEMPLATE` (the Jinja template exported with Hugging Face tokenizers) and
:func:`loss_mask_from_ids` (the loss mask recovered from token ids alone, at training time).

Content is tokenised as ordinary text (``tokenizer.tokenize``, tiktoken's ``encode_ordinary``),
as pre-training documents are: a literal ``<|im_end|>`` typed inside a message stays text and
cannot end the turn. The role headers and ``<|im_end|>`` are the special token ids. Because
content never contains those ids, the loss mask can be recovered from the ids alone.

The loss falls on each assistant message's content and its closing ``<|im_end|>`` (so the model
learns to stop); system and user turns and every role header ``<|im_start|>role<|im_sep|>`` get
no loss.

Conversations on disk are JSON objects ``{"messages": [{"role": ..., "content": ...}, ...]}``
(optionally with ``"id"`` and other fields, which are ignored); :func:`parse_conversation`
validates one and says precisely what is wrong with a bad one.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

IM_START = "<|im_start|>"
"""Opens a message, followed by the role."""
IM_SEP = "<|im_sep|>"
"""Separates the role from the content."""
IM_END = "<|im_end|>"
"""Closes a message (Phi-4's eos token: generation stops at it)."""
ROLES = ("system", "user", "assistant")
"""The roles a message may have."""

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'" + IM_START + "' + message['role'] + '" + IM_SEP + "' + message['content'] + '"
    + IM_END + "'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant" + IM_SEP + "' }}{% endif %}"
)
"""Phi-4's chat template for Hugging Face tokenizers (``tokenizer_config.json``); it renders the
same string as :func:`chat_text`."""

CONVERSATION_FORMAT = ('{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, '
                       '...]} with at least one assistant message')
"""What a conversation must look like, for error messages."""

_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
                    float: "a number", bool: "a boolean", type(None): "null"}


class ChatFormatError(ValueError):
    """A conversation, or a tokenizer, that Phi-4's chat format cannot use.

    The message says what is wrong and how to fix it; :attr:`reason` is the first part alone
    (what is wrong), for callers that add their own context and fix (a file and line number).
    """

    def __init__(self, reason: str, fix: str = f"a conversation is {CONVERSATION_FORMAT}"):
        super().__init__(f"{reason}; {fix}" if fix else reason)
        self.reason = reason


class ChatTokenIds(NamedTuple):
    """The special ids of the chat format for one tokenizer."""

    im_start: int
    im_sep: int
    im_end: int
    headers: Dict[str, Tuple[int, ...]]
    """``<|im_start|>`` + ``tokenize(role)`` + ``<|im_sep|>`` for each role of :data:`ROLES`."""


_IDS_CACHE: "weakref.WeakKeyDictionary[Any, ChatTokenIds]" = weakref.WeakKeyDictionary()


def chat_token_ids(tokenizer) -> ChatTokenIds:
    """The chat format's special and header ids for ``tokenizer`` (computed once per tokenizer).

    Args:
        tokenizer: has ``encode`` (special tokens recognised) and ``tokenize`` (ordinary text),
            as :mod:`megaphi.data.tokenizer`'s tokenizers do.

    Raises:
        ChatFormatError: the tokenizer does not have ``<|im_start|>``, ``<|im_sep|>`` and
            ``<|im_end|>`` as single special tokens.
    """
    try:
        return _IDS_CACHE[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (then not cached)
        pass
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "tokenize"):
        raise ChatFormatError(f"tokenizer {name} has no encode/tokenize methods",
                              "use one from megaphi.data.tokenizer.load_tokenizer")
    specials = []
    for token in (IM_START, IM_SEP, IM_END):
        ids = list(tokenizer.encode(token))
        if len(ids) != 1:
            raise ChatFormatError(
                f"tokenizer {name} has no special token {token} (it encodes to {len(ids)} ids "
                f"{ids[:8]})",
                "Phi-4's chat format needs <|im_start|>, <|im_sep|> and <|im_end|> as single "
                "special tokens: use the 'phi4' tokenizer (--tokenizer phi4, data.tokenizer: "
                "phi4) or a Hugging Face tokenizer that defines them")
        specials.append(int(ids[0]))
    im_start, im_sep, im_end = specials
    headers = {role: (im_start, *map(int, tokenizer.tokenize(role)), im_sep) for role in ROLES}
    ids = ChatTokenIds(im_start, im_sep, im_end, headers)
    try:
        _IDS_CACHE[tokenizer] = ids
    except TypeError:
        pass
    return ids


def parse_conversation(obj: Any) -> List[Dict[str, str]]:
    """Validate one decoded JSON value as a conversation and return its messages.

    A conversation is an object with ``"messages"``: a non-empty array of objects, each with a
    ``role`` from :data:`ROLES` and a string ``content``, at least one of them an assistant
    message (else there is nothing to train on). ``"id"`` and any other fields of the object,
    and fields of a message other than ``role`` and ``content``, are allowed and ignored.

    Args:
        obj: the value of one JSON line (``json.loads``).

    Returns:
        The messages as new ``{"role": ..., "content": ...}`` dicts, in order.

    Raises:
        ChatFormatError: the value is not a valid conversation; :attr:`ChatFormatError.reason`
            says precisely why (e.g. ``"message 2 has unknown role 'bot'; roles are system,
            user, assistant"``), with messages numbered from 1.
    """
    if not isinstance(obj, dict):
        raise ChatFormatError(f"the conversation is {_type_name(obj)}, not a JSON object")
    messages = parse_messages(obj, "messages", "'messages'", when_empty=": nothing to train on")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("no assistant message: nothing to train on")
    return messages


def render_chat(messages: Sequence[Dict[str, str]], tokenizer,
                add_generation_prompt: bool = False) -> Tuple[List[int], List[int]]:
    """Token ids of a conversation in Phi-4's chat format, and the loss mask over them.

    Each message is ``<|im_start|>`` + ``tokenize(role)`` + ``<|im_sep|>`` (the header) +
    ``tokenize(content)`` + ``<|im_end|>``; content is ordinary text, so special-token strings
    in it stay text. No BOS and nothing between messages.

    Args:
        messages: ``{"role": ..., "content": ...}`` dicts (roles from :data:`ROLES`), e.g. from
            :func:`parse_conversation`. Other keys are ignored.
        tokenizer: a tokenizer with Phi-4's chat special tokens (see :func:`chat_token_ids`).
        add_generation_prompt: append the assistant header ``<|im_start|>assistant<|im_sep|>``
            (mask 0), for prompting a model to answer.

    Returns:
        ``(ids, mask)`` of the same length: ``mask`` is 1 exactly on each assistant message's
        content tokens and its closing ``<|im_end|>``, 0 elsewhere (system and user turns,
        every role header, the generation prompt).

    Raises:
        ChatFormatError: a message has an unknown role or non-string content, or the tokenizer
            lacks the chat special tokens.
    """
    special = chat_token_ids(tokenizer)
    ids: List[int] = []
    mask: List[int] = []
    for number, message in enumerate(messages, start=1):
        message = _check_message(message, number)
        header = special.headers[message["role"]]
        content = tokenizer.tokenize(message["content"])
        trained = int(message["role"] == "assistant")
        ids.extend(header)
        ids.extend(content)
        ids.append(special.im_end)
        mask.extend([0] * len(header))
        mask.extend([trained] * (len(content) + 1))
    if add_generation_prompt:
        header = special.headers["assistant"]
        ids.extend(header)
        mask.extend([0] * len(header))
    return [int(i) for i in ids], mask


def chat_text(messages: Sequence[Dict[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation in Phi-4's chat format as a string (what :data:`PHI4_CHAT_TEMPLATE` renders).

    For display and for prompts. Encoding this string with special tokens recognised gives
    :func:`render_chat`'s ids only when no content contains a special-token string; training
    data goes through :func:`render_chat`, which keeps content as ordinary text.

    Args:
        messages: ``{"role": ..., "content": ...}`` dicts (roles from :data:`ROLES`).
        add_generation_prompt: end with the assistant header, ready for the answer.

    Raises:
        ChatFormatError: a message has an unknown role or non-string content.
    """
    parts = []
    for number, message in enumerate(messages, start=1):
        message = _check_message(message, number)
        parts.append(f"{IM_START}{message['role']}{IM_SEP}{message['content']}{IM_END}")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant{IM_SEP}")
    return "".join(parts)


def loss_mask_from_ids(ids: Sequence[int], tokenizer) -> np.ndarray:
    """The loss mask of rendered chat token ids, recovered from the ids alone.

    After each assistant header (``<|im_start|>assistant<|im_sep|>``) the mask is 1 through the
    next ``<|im_end|>`` inclusive, and 0 everywhere else. On the output of :func:`render_chat`
    this is exactly its mask, because content (ordinary text) never contains the special ids.
    An assistant turn cut off before its ``<|im_end|>`` (a truncated sequence) is masked to the
    end; other tokens (e.g. the end-of-document token after a conversation) get 0.

    Args:
        ids: token ids of one or more rendered conversations (a list or a 1-D integer array).
        tokenizer: the tokenizer that rendered them (see :func:`chat_token_ids`).

    Returns:
        A ``uint8`` array of 0/1, the same length as ``ids``.
    """
    special = chat_token_ids(tokenizer)
    ids = np.asarray(ids)
    n = len(ids)
    mask = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return mask
    header = special.headers["assistant"]  # Python ints: compared exactly whatever ids' dtype
    width = len(header)
    if n < width:
        return mask
    starts = np.flatnonzero(ids[:n - width + 1] == header[0])
    for k in range(1, width):  # keep the <|im_start|> that the rest of the header follows
        starts = starts[ids[starts + k] == header[k]]
    begins = starts + width  # first content token of each assistant turn
    begins = begins[begins < n]  # a header at the very end (a generation prompt) masks nothing
    if not len(begins):
        return mask
    closes = np.flatnonzero(ids == special.im_end)
    which = np.searchsorted(closes, begins)  # the first <|im_end|> at or after each begin
    ends = np.where(which < len(closes), closes[np.minimum(which, len(closes) - 1)], n - 1)
    delta = np.zeros(n + 1, dtype=np.int32)
    np.add.at(delta, begins, 1)
    np.add.at(delta, ends + 1, -1)
    mask[np.cumsum(delta[:n]) > 0] = 1
    return mask


def parse_messages(obj: Dict[str, Any], key: str, label: str, when_empty: str,
                   message_label: str = "message") -> List[Dict[str, str]]:
    """The valid messages under ``obj[key]`` (a non-empty array of messages), as new dicts.

    Shared by conversations (``"messages"``) and preference prompts (``"prompt"``). Reasons
    name the array as ``label`` and each message as ``message_label`` plus its number from 1;
    an empty array's reason ends with ``when_empty``.

    Raises:
        ChatFormatError: the key is missing, its value is not a non-empty array, or a message
            is invalid (see :func:`_check_message`).
    """
    if key not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ChatFormatError(f"no key {key!r} (keys: {keys})")
    raw = obj[key]
    if not isinstance(raw, list):
        raise ChatFormatError(f"{label} is {_type_name(raw)}, not an array of messages")
    if not raw:
        raise ChatFormatError(f"{label} is empty{when_empty}")
    return [_check_message(message, number, message_label)
            for number, message in enumerate(raw, start=1)]


def _check_message(message: Any, number: int, label: str = "message") -> Dict[str, str]:
    """The role and content of a valid message; else ChatFormatError naming ``label number``."""
    name = f"{label} {number}"
    if not isinstance(message, dict):
        raise ChatFormatError(f"{name} is {_type_name(message)}, not an object with "
                              "'role' and 'content'")
    for key in ("role", "content"):
        if key not in message:
            keys = ", ".join(repr(k) for k in list(message)[:8]) or "none"
            raise ChatFormatError(f"{name} has no {key!r} (keys: {keys})")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ChatFormatError(f"{name} has unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatFormatError(f"{name} content is {_type_name(content)}, not a string")
    return {"role": role, "content": content}


def _type_name(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
