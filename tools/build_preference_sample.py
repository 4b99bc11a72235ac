"""Build the shipped preference sample (examples/data/preference) from the chat sample.

Constructed stand-ins for DPO data, not Pivotal Token Search output and not judge-labelled: from
each conversation of ``examples/data/chat/faq_train.jsonl`` (Python FAQ questions with the FAQ's own
answers), in file order,

* a **full-length pair**: the prompt is the conversation without its answer (system message, if
  any, and the question); chosen is the conversation's real answer, rejected the answer to another
  question, picked by ``sha1(id + "/full")``;
* a **token pair**: the context is the prompt, the assistant header and the first ``k`` tokens of
  the real answer (``k`` from ``sha1(id + "/k")``, below 48 and below both answers' lengths);
  chosen is the real answer's next token, rejected the token at the same position of another
  question's answer (picked by ``sha1(id + "/token")``). Pairs whose two tokens are equal are
  skipped.

The first 120 of each are kept, the two kinds interleaved in conversation order; every fourth
full pair gives chosen/rejected in TRL's conversational form. Token ids are the Phi-4 tokenizer's.
Everything is deterministic: rerunning gives a byte-identical file::

    python tools/build_preference_sample.py          # writes examples/data/preference/
    python tools/build_preference_sample.py --stats  # also prints counts for the README
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "data" / "chat" / "faq_train.jsonl"
OUT = REPO / "examples" / "data" / "preference"
PAIRS = 120  # of each kind
MAX_PREFIX = 48  # token pairs: the answer prefix is shorter than this
SOURCE_NOTE = ("constructed from examples/data/chat/faq_train.jsonl (Python FAQ, PSF licence) by "
               "tools/build_preference_sample.py")


def digest(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def other(convs: list, i: int, salt: str) -> int:
    """A deterministic index of another conversation than ``i``."""
    n = len(convs)
    return (i + 1 + digest(convs[i]["id"] + salt) % (n - 1)) % n


def build(source: Path = SOURCE) -> list:
    """The pairs, as JSON-ready dicts, in output order."""
    from megaphi.data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    with open(source, encoding="utf-8") as f:
        convs = [json.loads(line) for line in f if line.strip()]
    answers = [c["messages"][-1]["content"] for c in convs]
    tokens = [tok.tokenize(a) for a in answers]
    full, token = [], []
    for i, conv in enumerate(convs):
        assert conv["messages"][-1]["role"] == "assistant", conv["id"]
        prompt = conv["messages"][:-1]
        j = other(convs, i, "/full")
        if len(full) < PAIRS and answers[j] != answers[i]:
            chosen, rejected = answers[i], answers[j]
            if len(full) % 4 == 3:  # TRL's conversational form
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            full.append({"id": f"{conv['id']}/full", "prompt": prompt, "chosen": chosen,
                         "rejected": rejected, "rejected_from": convs[j]["id"],
                         "source": SOURCE_NOTE})
        j = other(convs, i, "/token")
        limit = min(len(tokens[i]), len(tokens[j]), MAX_PREFIX)
        k = digest(conv["id"] + "/k") % limit
        if len(token) < PAIRS and tokens[i][k] != tokens[j][k]:
            token.append({"id": f"{conv['id']}/token", "prompt": prompt,
                          "prefix_ids": tokens[i][:k], "chosen_token_id": tokens[i][k],
                          "rejected_token_id": tokens[j][k], "position": k,
                          "rejected_from": convs[j]["id"], "source": SOURCE_NOTE})
    if len(full) < PAIRS or len(token) < PAIRS:
        raise SystemExit(f"only {len(full)} full and {len(token)} token pairs from {source}")
    return [pair for both in zip(full, token) for pair in both]


def write(path: Path, pairs: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")


def stats(pairs: list) -> str:
    """Counts and token lengths as stored (megaphi.data.preference.parse_pair, Phi-4 tokenizer)."""
    from megaphi.data.preference import FULL, parse_pair
    from megaphi.data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    kinds = [parse_pair(p, tok) for p in pairs]
    full = [seqs for kind, seqs in kinds if kind == FULL]
    token = [seqs for kind, seqs in kinds if kind != FULL]
    conversational = sum(isinstance(p.get("chosen"), list) for p in pairs)
    return (f"{len(pairs)} pairs: {len(full)} full ({conversational} in TRL's conversational "
            f"form), {len(token)} token; full: {sum(len(s[0]) for s in full):,} prompt, "
            f"{sum(len(s[1]) for s in full):,} chosen, {sum(len(s[2]) for s in full):,} "
            f"rejected tokens; token: {sum(len(s[0]) for s in token):,} context tokens "
            f"(min {min(len(s[0]) for s in token)}, max {max(len(s[0]) for s in token)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    parser.add_argument("--stats", action="store_true", help="print counts (Phi-4 tokenizer)")
    args = parser.parse_args(argv)
    pairs = build()
    write(args.out / "faq_pairs.jsonl", pairs)
    print(f"wrote {len(pairs)} pairs to {args.out / 'faq_pairs.jsonl'}", file=sys.stderr)
    if args.stats:
        print(stats(pairs))


if __name__ == "__main__":
    main()
