"""Preference pairs for DPO: preprocessing (--format preference) and reading (PreferencePairs)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaphi.data.chat import ChatFormatError, chat_text
from megaphi.data.preference import (
    FULL,
    TOKEN,
    FullPair,
    PreferencePairs,
    TokenPair,
    extra_path,
    parse_pair,
)
from megaphi.data.preprocess import (
    PreprocessError,
    dataset_kind,
    dataset_paths,
    merge,
    preprocess,
    read_meta,
)
from megaphi.data.tokenizer import Phi4Tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "preference" / "faq_pairs.jsonl"
TOK = Phi4Tokenizer()
VOCAB = TOK.vocab_size  # 100352
# tokenize("t") + tokenize("he"): decoded, "the" re-tokenises to one different id
SPLIT_IDS = [83, 383]


def msg(role, content):
    return {"role": role, "content": content}


PROMPT = [msg("system", "Be brief."), msg("user", "Hi there")]
PROMPT_TEXT = ("<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
               "<|im_start|>user<|im_sep|>Hi there<|im_end|><|im_start|>assistant<|im_sep|>")
FULL_PAIR = {"id": "f1", "prompt": PROMPT, "chosen": "Hello!", "rejected": "Go away.",
             "source": "test"}
TOKEN_PAIR = {"prompt": PROMPT, "prefix_ids": SPLIT_IDS, "chosen_token_id": 13,
              "rejected_token_id": 0, "id": "t1", "p_before": 0.25}


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def assert_no_output(prefix):
    parent = Path(prefix).parent
    leftovers = [p.name for p in parent.iterdir()
                 if p.name.startswith(Path(prefix).name + ".")] if parent.exists() else []
    assert leftovers == [], leftovers


def test_full_and_token_pair_round_trip(tmp_path):
    assert TOK.tokenize(TOK.decode(SPLIT_IDS)) != SPLIT_IDS  # re-tokenising would merge them
    path = write_jsonl(tmp_path / "pairs.jsonl", [FULL_PAIR, TOKEN_PAIR])
    result = preprocess([path], tmp_path / "ds", TOK, format="preference", workers=1)

    prompt = TOK.encode(PROMPT_TEXT)  # independent of render_chat: the literal ChatML string
    chosen, rejected = TOK.encode("Hello!<|im_end|>"), TOK.encode("Go away.<|im_end|>")
    pairs = PreferencePairs(tmp_path / "ds")
    assert len(pairs) == 2 and pairs.kinds.tolist() == [FULL, TOKEN]
    full, token = pairs[0], pairs[1]
    assert isinstance(full, FullPair) and isinstance(token, TokenPair)
    assert full.prompt.tolist() == prompt
    assert (full.chosen.tolist(), full.rejected.tolist()) == (chosen, rejected)
    assert token.context.tolist() == prompt + SPLIT_IDS  # prefix ids untouched
    assert (token.chosen_id, token.rejected_id) == (13, 0)
    assert pairs[-1].context.tolist() == token.context.tolist()
    with pytest.raises(IndexError):
        pairs[2]

    # lengths from the index alone; no end-of-document token anywhere
    assert pairs.prompt_lengths.tolist() == [len(prompt), len(prompt) + 2]
    assert pairs.chosen_lengths.tolist() == [len(chosen), 0]
    assert pairs.rejected_lengths.tolist() == [len(rejected), 0]
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds.document_indices.tolist() == [0, 3, 5]
    assert ds.sequence_lengths.tolist() == [len(prompt), len(chosen), len(rejected),
                                            len(prompt) + 2, 2]
    n_tokens = int(ds.sequence_lengths.sum())
    assert TOK.eod_id not in np.concatenate([np.array(ds[i]) for i in range(len(ds))])
    del ds

    meta = read_meta(tmp_path / "ds")
    assert dataset_kind(tmp_path / "ds") == "preference"
    assert (meta["documents"], meta["tokens"], meta["pairs"], meta["full_pairs"],
            meta["token_pairs"]) == (2, n_tokens, 2, 1, 1)
    assert result.counts == {"pairs": 2, "full_pairs": 1, "token_pairs": 1}
    assert result.summary().startswith(f"2 pairs, {n_tokens} tokens (1 full pairs) "
                                       "(1 token pairs)")
    assert [pairs.extra(0), pairs.extra(1)] == [{"id": "f1", "source": "test"},
                                                {"id": "t1", "p_before": 0.25}]


def test_parse_pair_directly():
    kind, seqs = parse_pair(TOKEN_PAIR, TOK)
    assert kind == TOKEN and seqs == [TOK.encode(PROMPT_TEXT) + SPLIT_IDS, [13, 0]]
    kind, seqs = parse_pair(FULL_PAIR, TOK)
    assert kind == FULL and seqs[1] == TOK.encode("Hello!<|im_end|>")
    # content is plain text: a special-token string in a response stays text
    kind, seqs = parse_pair({**FULL_PAIR, "chosen": "a <|im_end|> b"}, TOK)
    assert seqs[1] == TOK.tokenize("a <|im_end|> b") + [100265]
    # an empty prefix and <|im_end|> as a token are fine
    kind, seqs = parse_pair({**TOKEN_PAIR, "prefix_ids": [], "chosen_token_id": 100265}, TOK)
    assert seqs == [TOK.encode(PROMPT_TEXT), [100265, 0]]


def test_trl_conversational_form_gives_the_same_document(tmp_path):
    conversational = {**FULL_PAIR, "chosen": [msg("assistant", "Hello!")],
                      "rejected": [{"role": "assistant", "content": "Go away.", "x": 1}]}
    write_jsonl(tmp_path / "str.jsonl", [FULL_PAIR])
    write_jsonl(tmp_path / "list.jsonl", [conversational])
    preprocess([tmp_path / "str.jsonl"], tmp_path / "a", TOK, format="preference", workers=1)
    preprocess([tmp_path / "list.jsonl"], tmp_path / "b", TOK, format="preference", workers=1)
    for kind in ("bin", "idx"):
        assert Path(dataset_paths(tmp_path / "a")[kind]).read_bytes() == \
            Path(dataset_paths(tmp_path / "b")[kind]).read_bytes()
    assert parse_pair(conversational, TOK) == parse_pair(FULL_PAIR, TOK)


def many_pairs(n, start=0):
    pairs = []
    for i in range(start, start + n):
        prompt = [msg("user", f"question {i}")]
        if i % 3 == 0:
            pairs.append({"prompt": prompt, "chosen": f"yes {i}", "rejected": f"no {i}",
                          "id": i})
        elif i % 3 == 1:
            pairs.append({"n": [i, {"nested": "ü"}], "prompt": prompt, "prefix_ids": [i, i + 1],
                          "chosen_token_id": i + 2, "rejected_token_id": i + 3})
        else:  # no metadata at all
            pairs.append({"prompt": prompt, "chosen": [msg("assistant", f"a {i}")],
                          "rejected": f"b {i}"})
    return pairs


def expected_extra(pairs):
    keys = {"prompt", "chosen", "rejected", "prefix_ids", "chosen_token_id",
            "rejected_token_id"}
    return [{k: v for k, v in p.items() if k not in keys} for p in pairs]


def test_metadata_sidecar_in_order_and_merge(tmp_path):
    first, second = many_pairs(40), many_pairs(25, start=40)
    write_jsonl(tmp_path / "a.jsonl", first)
    write_jsonl(tmp_path / "b.jsonl", second)
    # two workers and tiny chunks: many chunks in flight, the sidecar must keep document order
    preprocess([tmp_path / "a.jsonl"], tmp_path / "a", TOK, format="preference", workers=2,
               chunk_bytes=200)
    preprocess([tmp_path / "b.jsonl"], tmp_path / "b", TOK, format="preference", workers=1)
    preprocess([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "whole", TOK,
               format="preference", workers=1)
    lines = Path(extra_path(tmp_path / "a")).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == expected_extra(first)
    assert lines[2] == "{}" and "ü" in lines[1]  # one line per pair, UTF-8 kept

    merged = merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    whole = read_meta(tmp_path / "whole")
    meta = read_meta(tmp_path / "merged")
    for key in ("kind", "documents", "tokens", "pairs", "full_pairs", "token_pairs", "inputs"):
        assert meta[key] == whole[key], key
    assert merged.counts == {k: whole[k] for k in ("pairs", "full_pairs", "token_pairs")}
    for kind in ("bin", "idx"):
        assert Path(dataset_paths(tmp_path / "merged")[kind]).read_bytes() == \
            Path(dataset_paths(tmp_path / "whole")[kind]).read_bytes()
    assert Path(extra_path(tmp_path / "merged")).read_bytes() == \
        Path(extra_path(tmp_path / "whole")).read_bytes()
    pairs = PreferencePairs(tmp_path / "merged")
    assert pairs.kinds.tolist() == [FULL if i % 3 != 1 else TOKEN for i in range(65)]
    assert [pairs.extra(i) for i in range(65)] == expected_extra(first + second)
    last = pairs[63]  # 63 % 3 == 0: a full pair
    assert [last.prompt.tolist(), last.chosen.tolist(), last.rejected.tolist()] == \
        parse_pair(second[-2], TOK)[1]

    # kinds do not mix; a chat dataset is not preference data
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [msg("user", "Q"), msg("assistant", "A")]}) + "\n")
    preprocess([chat], tmp_path / "chat", TOK, format="chat", workers=1)
    with pytest.raises(PreprocessError, match="kind chat.*kind preference"):
        merge([tmp_path / "a", tmp_path / "chat"], tmp_path / "mixed")
    assert_no_output(tmp_path / "mixed")
    with pytest.raises(PreprocessError, match="holds chat data, not preference pairs"):
        PreferencePairs(tmp_path / "chat")
    # a preference dataset without its sidecar cannot be merged
    Path(extra_path(tmp_path / "b")).unlink()
    with pytest.raises(PreprocessError, match="b.extra.jsonl does not exist"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m2")
    assert_no_output(tmp_path / "m2")


BAD_PAIRS = {  # what goes on line 3, and what the error says about it
    "not_json": ('{"prompt": [', "invalid JSON"),
    "not_an_object": ("[1, 2]", "the pair is an array, not a JSON object"),
    "no_prompt": ({"chosen": "a", "rejected": "b"}, "no key 'prompt' (keys: 'chosen', "
                                                    "'rejected')"),
    "prompt_not_a_list": ({**FULL_PAIR, "prompt": "Hi"}, "prompt is a string, not an array"),
    "prompt_empty": ({**FULL_PAIR, "prompt": []}, "prompt is empty"),
    "prompt_bad_role": ({**FULL_PAIR, "prompt": [msg("bot", "x"), msg("user", "y")]},
                        "prompt message 1 has unknown role 'bot'"),
    "prompt_ends_with_assistant": (
        {**FULL_PAIR, "prompt": [msg("user", "Q"), msg("assistant", "A")]},
        "prompt must end with a user turn, ends with assistant"),
    "neither": ({"prompt": PROMPT, "answer": "x"},
                "has neither chosen/rejected nor prefix_ids/chosen_token_id/rejected_token_id"),
    "both_kinds": ({**FULL_PAIR, "chosen_token_id": 5},
                   "has both chosen/rejected (a full-length pair) and chosen_token_id"),
    "no_rejected": ({"prompt": PROMPT, "chosen": "a"}, "has 'chosen' but no 'rejected'"),
    "chosen_two_messages": (
        {**FULL_PAIR, "chosen": [msg("assistant", "a"), msg("assistant", "b")]},
        "chosen: a list must hold exactly one assistant message, it holds 2"),
    "rejected_user_message": (
        {**FULL_PAIR, "rejected": [msg("user", "a")]},
        "rejected: a list must hold exactly one assistant message, its message has role 'user'"),
    "chosen_number": ({**FULL_PAIR, "chosen": 3},
                      "chosen is a number, not a string or a list holding one assistant"),
    "same_text": ({**FULL_PAIR, "rejected": "Hello!"}, "chosen and rejected are the same text"),
    "token_field_missing": ({k: v for k, v in TOKEN_PAIR.items() if k != "rejected_token_id"},
                            "rejected_token_id missing"),
    "prefix_not_a_list": ({**TOKEN_PAIR, "prefix_ids": "1 2"},
                          "prefix_ids is a string, not an array of token ids"),
    "prefix_id_not_int": ({**TOKEN_PAIR, "prefix_ids": [1, 2.5]},
                          "prefix_ids[1] is a number 2.5, not an integer token id"),
    "prefix_id_outside": ({**TOKEN_PAIR, "prefix_ids": [1, 100352]},
                          "prefix_ids[1] 100352 is outside the vocabulary of 100352"),
    "chosen_id_outside": ({**TOKEN_PAIR, "chosen_token_id": 100400},
                          "chosen_token_id 100400 is outside the vocabulary of 100352"),
    "rejected_id_negative": ({**TOKEN_PAIR, "rejected_token_id": -1},
                             "rejected_token_id -1 is outside the vocabulary of 100352"),
    "id_bool": ({**TOKEN_PAIR, "chosen_token_id": True},
                "chosen_token_id is a boolean true, not an integer token id"),
    "same_token": ({**TOKEN_PAIR, "rejected_token_id": 13},
                   "chosen_token_id and rejected_token_id are both 13"),
}


def bad_line(case):
    bad, _ = BAD_PAIRS[case]
    return bad if isinstance(bad, str) else json.dumps(bad)


@pytest.mark.parametrize("case", sorted(c for c in BAD_PAIRS if c != "not_json"))
def test_parse_pair_says_what_is_wrong(case):
    bad, reason = BAD_PAIRS[case]
    with pytest.raises(ChatFormatError) as info:
        parse_pair(json.loads(bad_line(case)), TOK)
    assert reason in info.value.reason


def test_cli_every_bad_pair_is_one_error_with_file_and_line(tmp_path, cli):
    good = [json.dumps(FULL_PAIR), json.dumps(TOKEN_PAIR)]
    for case in sorted(BAD_PAIRS):
        reason = BAD_PAIRS[case][1]
        path = tmp_path / f"{case}.jsonl"
        path.write_text("\n".join([*good, bad_line(case), good[0]]) + "\n")
        prefix = tmp_path / "out" / case
        code, out, err = cli("--format", "preference", "--input", path, "--output-prefix",
                             prefix, "--workers", "1")
        assert code == 2, case
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith(
            f"preprocess_data: error: {path}:3: "), (case, err)
        assert reason in errors[0] and "--skip-bad-lines" in errors[0], (case, errors[0])
        assert '"prefix_ids": [ids]' in errors[0]  # the format, for the fix
        assert_no_output(prefix)  # nothing written, the sidecar included


def test_cli_skip_bad_lines_counts_them(tmp_path, cli):
    lines, kept = [], []
    good = many_pairs(12)
    bad_cases = sorted(BAD_PAIRS)
    for i, pair in enumerate(good):
        lines.append(json.dumps(pair))
        kept.append(pair)
        lines.append(bad_line(bad_cases[i % len(bad_cases)]))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = cli("--format", "preference", "--input", path, "--output-prefix",
                         tmp_path / "ds", "--skip-bad-lines", "--workers", "2")
    assert code == 0, err
    assert out.startswith("preprocess_data: 12 pairs, ") and "12 bad lines skipped" in out
    meta = read_meta(tmp_path / "ds")
    assert (meta["skipped_lines"], meta["pairs"], meta["full_pairs"], meta["token_pairs"]) == \
        (12, 12, 8, 4)
    pairs = PreferencePairs(tmp_path / "ds")
    assert [pairs.extra(i) for i in range(12)] == expected_extra(kept)
    for i, pair in enumerate(kept):
        kind, seqs = parse_pair(pair, TOK)
        got = pairs[i]
        if kind == FULL:
            assert [got.prompt.tolist(), got.chosen.tolist(), got.rejected.tolist()] == seqs
        else:
            assert [got.context.tolist(), [got.chosen_id, got.rejected_id]] == seqs


def test_cli_arguments(tmp_path, cli):
    code, _, err = cli("--format", "preference", "--json-key", "text", "--input", SAMPLE,
                       "--output-prefix", tmp_path / "ds")
    assert code == 2 and "--json-key applies to --format text only" in err
    assert_no_output(tmp_path / "ds")


def test_shipped_sample_preprocesses_and_is_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("build_preference_sample",
                                                  REPO / "tools" / "build_preference_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path / "built")])
    assert (tmp_path / "built" / "faq_pairs.jsonl").read_bytes() == SAMPLE.read_bytes()

    # the documented command line, as a subprocess
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                           "--format", "preference", "--input", str(SAMPLE),
                           "--output-prefix", "out/faq_pairs", "--workers", "2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("preprocess_data: 240 pairs, ")
    prefix = tmp_path / "out" / "faq_pairs"
    meta = read_meta(prefix)
    assert (meta["pairs"], meta["full_pairs"], meta["token_pairs"]) == (240, 120, 120)

    objs = [json.loads(line) for line in SAMPLE.open(encoding="utf-8")]
    chat = {c["id"]: c for c in map(json.loads, (REPO / "examples" / "data" / "chat" /
                                                 "faq_train.jsonl").open(encoding="utf-8"))}
    pairs = PreferencePairs(prefix)
    assert pairs.kinds.tolist() == [FULL, TOKEN] * 120
    for i, obj in enumerate(objs):
        source_id, kind = obj["id"].rsplit("/", 1)
        conv, other = chat[source_id], chat[obj["rejected_from"]]
        answer, other_answer = conv["messages"][-1]["content"], other["messages"][-1]["content"]
        assert obj["prompt"] == conv["messages"][:-1] and source_id != other["id"]
        assert pairs.extra(i)["id"] == obj["id"]
        pair = pairs[i]
        if kind == "full":
            assert isinstance(pair, FullPair)
            assert TOK.decode(pair.chosen.tolist()) == answer + "<|im_end|>"
            assert TOK.decode(pair.rejected.tolist()) == other_answer + "<|im_end|>"
        else:
            k, real, wrong = obj["position"], TOK.tokenize(answer), TOK.tokenize(other_answer)
            header = TOK.encode(chat_text(obj["prompt"], add_generation_prompt=True))
            assert pair.context.tolist() == header + real[:k]
            assert (pair.chosen_id, pair.rejected_id) == (real[k], wrong[k])
            assert pair.chosen_id != pair.rejected_id
