"""Build the shipped chat sample (examples/data/chat) from the sample corpus's Python FAQ.

Each of the 178 Python FAQ documents of ``examples/data/sample/synthetic.jsonl`` (ids starting with
``pydoc-faq-``) is a question heading, its reST underline, a blank line and the answer. It becomes
one conversation: the user asks the question (the heading line), the assistant gives the answer
(the rest, reST markup kept). About a third of the conversations start with a short system
message. A fixed set of 18 (the first by ``sha1(id)``) is held out for validation.

Everything is deterministic: rerunning gives byte-identical files::

    python tools/build_chat_sample.py            # writes examples/data/chat/faq_{train,valid}.jsonl
    python tools/build_chat_sample.py --stats    # also prints the token counts for the README
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "data" / "sample" / "synthetic.jsonl"
OUT = REPO / "examples" / "data" / "chat"
PREFIX = "pydoc-faq-"
VALID = 18
SYSTEM_MESSAGES = (  # one in three conversations gets one of these, by sha1(id)
    "You are a helpful Python expert.",
    "You are a helpful Python expert. Answer questions about the Python language and its "
    "standard library.",
    "You answer frequently asked questions about Python accurately.",
)
_UNDERLINE = re.compile(r"([-=~^*+#\"'`])\1*")


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def conversation(doc: dict) -> dict:
    """One FAQ document as ``{"id", "messages", "source"}``."""
    lines = doc["text"].split("\n")
    question, underline = lines[0].strip(), lines[1]
    if not question or not _UNDERLINE.fullmatch(underline) or len(underline) < len(question):
        raise ValueError(f"{doc['id']}: does not start with a reST heading")
    answer = "\n".join(lines[2:]).strip("\n").rstrip()
    if not answer:
        raise ValueError(f"{doc['id']}: has no answer")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    digest = int(sha1(doc["id"]), 16)
    if digest % 3 == 0:
        system = SYSTEM_MESSAGES[(digest // 3) % len(SYSTEM_MESSAGES)]
        messages.insert(0, {"role": "system", "content": system})
    source = (f"{doc['source']}; as a conversation: tools/build_chat_sample.py from "
              "examples/data/sample/synthetic.jsonl")
    return {"id": doc["id"], "messages": messages, "source": source}


def build(source: Path = SOURCE) -> tuple:
    """``(train, valid)`` conversations, each in the order of the source file."""
    with open(source, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    faq = [doc for doc in docs if doc["id"].startswith(PREFIX)]
    held_out = {doc["id"] for doc in sorted(faq, key=lambda d: sha1(d["id"]))[:VALID]}
    convs = [conversation(doc) for doc in faq]
    return ([c for c in convs if c["id"] not in held_out],
            [c for c in convs if c["id"] in held_out])


def write(path: Path, convs: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for conv in convs:
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")


def stats(name: str, convs: list) -> str:
    """Token counts of the conversations as rendered (Phi-4 tokenizer, eod not counted)."""
    import numpy as np

    from megaphi.data.chat import render_chat
    from megaphi.data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    lengths, trained = [], 0
    for conv in convs:
        ids, mask = render_chat(conv["messages"], tok)
        lengths.append(len(ids))
        trained += sum(mask)
    lengths = np.array(lengths)
    with_system = sum(c["messages"][0]["role"] == "system" for c in convs)
    p = np.percentile(lengths, [10, 50, 90]).round().astype(int)
    return (f"{name}: {len(convs)} conversations ({with_system} with a system message), "
            f"{lengths.sum():,} tokens, {trained:,} assistant tokens; per conversation min "
            f"{lengths.min()}, p10 {p[0]}, median {p[1]}, p90 {p[2]}, max {lengths.max()}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    parser.add_argument("--stats", action="store_true", help="print token counts (Phi-4)")
    args = parser.parse_args(argv)
    train, valid = build()
    write(args.out / "faq_train.jsonl", train)
    write(args.out / "faq_valid.jsonl", valid)
    print(f"wrote {len(train)} + {len(valid)} conversations to {args.out}", file=sys.stderr)
    if args.stats:
        print(stats("faq_train", train))
        print(stats("faq_valid", valid))


if __name__ == "__main__":
    main()
