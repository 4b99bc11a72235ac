"""Phi-4 chat rendering (megaphi.data.chat) and chat-data preprocessing (--format chat)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaphi.data.chat import (
    IM_END,
    IM_SEP,
    IM_START,
    PHI4_CHAT_TEMPLATE,
    ROLES,
    ChatFormatError,
    chat_text,
    loss_mask_from_ids,
    parse_conversation,
    render_chat,
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
CHAT_DIR = REPO / "examples" / "data" / "chat"
SAMPLE_FILES = [CHAT_DIR / "faq_train.jsonl", CHAT_DIR / "faq_valid.jsonl"]
TOK = Phi4Tokenizer()
EOD, IM_START_ID, IM_END_ID, IM_SEP_ID = TOK.eod_id, 100264, 100265, 100266


def msg(role, content):
    return {"role": role, "content": content}


# Conversations whose content has no special-token strings: Hugging Face's fast tokenizer
# (which reads "<|im_end|>" in content as the special token) must give exactly our ids.
CONVERSATIONS = {
    "single_turn": [msg("user", "What is 2+2?"), msg("assistant", "4.")],
    "system": [msg("system", "You are a helpful Python expert."),
               msg("user", "How do I reverse a list?"),
               msg("assistant", "Use `xs[::-1]` for a copy or `xs.reverse()` in place.")],
    "multi_turn": [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!"),
                   msg("user", "And in French?"), msg("assistant", "Bonjour !"),
                   msg("user", "Thanks"), msg("assistant", "You're welcome.")],
    "unicode_and_whitespace": [
        msg("user", "naïve café, Ελληνικά, 日本語のテキスト, emoji 😀🚀\n\n"
                    "  indented\tand tabbed  "),
        msg("assistant", " Leading space.\n```python\nprint('∑∫√')\n```\n\n\n"
                         "trailing newlines\n\n"),
    ],
    "empty_contents": [msg("system", ""), msg("user", "Say nothing."), msg("assistant", "")],
    "ends_with_user": [msg("user", "Q1"), msg("assistant", "A1"), msg("user", "Q2")],
    "two_assistants_in_a_row": [msg("user", "Count"), msg("assistant", "1"),
                                msg("assistant", "2")],
}
# Special-token strings typed inside content: ordinary text for us (as in pre-training data).
LITERAL_SPECIALS = [
    msg("system", "Never print <|im_start|> or <|endoftext|>."),
    msg("user", "What does <|im_end|> mean? And <|im_sep|>?"),
    msg("assistant", "<|im_end|> ends a turn; <|im_start|>assistant<|im_sep|> opens one."),
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from megaphi.hf.tokenizer import build_phi4_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=build_phi4_tokenizer(),
                                   chat_template=PHI4_CHAT_TEMPLATE)


def sample_conversations():
    return [json.loads(line) for path in SAMPLE_FILES for line in path.open(encoding="utf-8")]


def runs(mask):
    """(begin, end) of each run of 1s in a 0/1 sequence."""
    padded = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


# ----------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_hf_chat_template(hf_tokenizer, name, generation_prompt):
    messages = CONVERSATIONS[name]
    ids, mask = render_chat(messages, TOK, add_generation_prompt=generation_prompt)
    want = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                            add_generation_prompt=generation_prompt)
    assert ids == list(want)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)
    assert chat_text(messages, add_generation_prompt=generation_prompt) == text
    assert TOK.decode(ids) == text
    if generation_prompt:
        assert ids[-3:] == [IM_START_ID, *TOK.tokenize("assistant"), IM_SEP_ID]
        assert mask[-3:] == [0, 0, 0]


def test_chat_text_is_the_template_even_with_special_strings(hf_tokenizer):
    text = chat_text(LITERAL_SPECIALS, add_generation_prompt=True)
    assert text == hf_tokenizer.apply_chat_template(LITERAL_SPECIALS, tokenize=False,
                                                    add_generation_prompt=True)
    assert text.startswith(f"{IM_START}system{IM_SEP}Never print <|im_start|>")
    assert chat_text([msg("user", "Hi")]) == "<|im_start|>user<|im_sep|>Hi<|im_end|>"


def test_format_matches_phi4_doc():
    """The documented string (shared/PHI4.md) and its known ids."""
    messages = [msg("system", "S"), msg("user", "P"), msg("assistant", "R")]
    assert chat_text(messages) == ("<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user"
                                   "<|im_sep|>P<|im_end|><|im_start|>assistant<|im_sep|>R"
                                   "<|im_end|>")
    ids, _ = render_chat([msg("user", "Hello"), msg("assistant", " World")], TOK)
    assert ids == [IM_START_ID, 882, IM_SEP_ID, 9906, IM_END_ID,
                   IM_START_ID, 78191, IM_SEP_ID, 4435, IM_END_ID]
    assert ids[0] == IM_START_ID and EOD not in ids  # no BOS, no eod


def test_special_strings_in_content_stay_text():
    ids, mask = render_chat(LITERAL_SPECIALS, TOK)
    expected = []
    for m in LITERAL_SPECIALS:
        expected += [IM_START_ID, *TOK.tokenize(m["role"]), IM_SEP_ID,
                     *TOK.tokenize(m["content"]), IM_END_ID]
    assert ids == expected
    # exactly one <|im_start|>, <|im_sep|> and <|im_end|> per message, whatever the content says
    for special in (IM_START_ID, IM_SEP_ID, IM_END_ID):
        assert ids.count(special) == len(LITERAL_SPECIALS)
    assert EOD not in ids
    assert loss_mask_from_ids(ids, TOK).tolist() == mask
    # the encoded string would read them as specials: that is why training uses render_chat
    assert TOK.encode(chat_text(LITERAL_SPECIALS)).count(IM_END_ID) > len(LITERAL_SPECIALS)


def test_hf_tokenizer_directory_renders_alike(tmp_path):
    """megaphi's HFTokenizer over the exported Phi-4 files renders the same ids (content is
    ordinary text there too) and its mask is recovered from ids."""
    from megaphi.data.tokenizer import HFTokenizer
    from megaphi.hf.tokenizer import write_phi4_tokenizer

    write_phi4_tokenizer(tmp_path, model_max_length=4096)
    hf = HFTokenizer(str(tmp_path))
    for messages in [*CONVERSATIONS.values(), LITERAL_SPECIALS]:
        ids, mask = render_chat(messages, hf)
        assert (ids, mask) == render_chat(messages, TOK)
        assert loss_mask_from_ids(ids, hf).tolist() == mask


def test_chat_prompt_uses_the_renderer():
    from megaphi.inference import chat_prompt

    assert chat_prompt("Q") == chat_text([msg("user", "Q")], add_generation_prompt=True)
    assert chat_prompt("Q", system="S") == (
        "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Q<|im_end|>"
        "<|im_start|>assistant<|im_sep|>")


def test_hf_tokenizer_module_reexports_the_template():
    from megaphi.hf import tokenizer as hf_tokenizer_module

    assert hf_tokenizer_module.PHI4_CHAT_TEMPLATE is PHI4_CHAT_TEMPLATE


# ----------------------------------------------------------------------------------------------
# Loss mask


@pytest.mark.parametrize("name", sorted(CONVERSATIONS) + ["literal_specials"])
def test_mask_is_assistant_content_and_its_im_end(name):
    messages = LITERAL_SPECIALS if name == "literal_specials" else CONVERSATIONS[name]
    ids, mask = render_chat(messages, TOK)
    spans = [TOK.decode(ids[b:e]) for b, e in runs(mask)]
    assert spans == [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    for b, e in runs(mask):  # masked spans hold no header token
        assert IM_START_ID not in ids[b:e] and IM_SEP_ID not in ids[b:e]
    assert loss_mask_from_ids(ids, TOK).tolist() == mask


def test_mask_from_ids_on_documents_packs_and_truncations():
    convs = list(CONVERSATIONS.values()) + [LITERAL_SPECIALS]
    rendered = [render_chat(m, TOK) for m in convs]
    # one document: the conversation and its eod (0)
    ids, mask = rendered[2]
    got = loss_mask_from_ids(np.asarray(ids + [EOD], dtype=np.int32), TOK)
    assert got.dtype == np.uint8 and got.tolist() == mask + [0]
    # many documents packed back to back
    packed_ids = [t for ids, _ in rendered for t in ids + [EOD]]
    packed_mask = [t for _, mask in rendered for t in mask + [0]]
    assert loss_mask_from_ids(packed_ids, TOK).tolist() == packed_mask
    # any prefix of the pack (a truncated sequence): an assistant turn cut short stays masked
    for cut in range(0, len(packed_ids) + 1):
        assert loss_mask_from_ids(packed_ids[:cut], TOK).tolist() == packed_mask[:cut], cut
    # a generation prompt at the end masks nothing
    ids, mask = render_chat(CONVERSATIONS["ends_with_user"], TOK, add_generation_prompt=True)
    assert loss_mask_from_ids(ids, TOK).tolist() == mask
    assert loss_mask_from_ids([], TOK).tolist() == []


def test_mask_from_ids_on_the_sample_and_a_16k_pack():
    convs = sample_conversations()
    pack_ids, pack_mask = [], []
    for conv in convs:
        ids, mask = render_chat(parse_conversation(conv), TOK)
        assert loss_mask_from_ids(ids, TOK).tolist() == mask, conv["id"]
        spans = [TOK.decode(ids[b:e]) for b, e in runs(mask)]
        assert spans == [m["content"] + IM_END for m in conv["messages"]
                         if m["role"] == "assistant"]
        pack_ids += ids + [EOD]
        pack_mask += mask + [0]
        if len(pack_ids) >= 16384:
            break
    assert np.array_equal(loss_mask_from_ids(np.asarray(pack_ids), TOK), pack_mask)


# ----------------------------------------------------------------------------------------------
# Validation


def test_parse_conversation_accepts_ids_and_extra_fields():
    obj = {"id": 7, "source": "x", "messages": [
        {"role": "user", "content": "Q", "name": "ann"}, {"role": "assistant", "content": "A"}]}
    assert parse_conversation(obj) == [msg("user", "Q"), msg("assistant", "A")]
    assert parse_conversation({"id": None, "messages": CONVERSATIONS["multi_turn"]}) == \
        CONVERSATIONS["multi_turn"]
    assert ROLES == ("system", "user", "assistant")


BAD_CONVERSATIONS = {
    "not_an_object": (["a", "list"], "is an array, not a JSON object"),
    "no_messages": ({"id": 1, "text": "hi"}, "no key 'messages' (keys: 'id', 'text')"),
    "messages_not_a_list": ({"messages": "hi"}, "'messages' is a string, not an array"),
    "empty": ({"messages": []}, "'messages' is empty"),
    "message_not_an_object": ({"messages": [msg("user", "Q"), "A"]},
                              "message 2 is a string, not an object"),
    "no_role": ({"messages": [{"content": "Q"}]}, "message 1 has no 'role'"),
    "no_content": ({"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
    "unknown_role": ({"messages": [msg("user", "Q"), msg("bot", "A")]},
                     "message 2 has unknown role 'bot'; roles are system, user, assistant"),
    "content_not_a_string": ({"messages": [{"role": "user", "content": 3},
                                           msg("assistant", "A")]},
                             "message 1 content is a number, not a string"),
    "content_null": ({"messages": [msg("user", "Q"), {"role": "assistant", "content": None}]},
                     "message 2 content is null, not a string"),
    "no_assistant": ({"messages": [msg("system", "S"), msg("user", "Q")]},
                     "no assistant message: nothing to train on"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_parse_conversation_says_what_is_wrong(case):
    obj, reason = BAD_CONVERSATIONS[case]
    with pytest.raises(ChatFormatError) as err:
        parse_conversation(obj)
    assert reason in err.value.reason and str(err.value).startswith(err.value.reason + "; ")
    assert '"messages"' in str(err.value)  # the fix: what a conversation looks like
    assert isinstance(err.value, ValueError)


def test_render_refuses_bad_messages_and_tokenizers():
    with pytest.raises(ChatFormatError, match="message 1 has unknown role 'tool'"):
        render_chat([msg("tool", "x")], TOK)
    with pytest.raises(ChatFormatError, match="message 2 content is an array"):
        chat_text([msg("user", "x"), {"role": "assistant", "content": ["x"]}])

    class PlainTokenizer(Phi4Tokenizer):  # no special tokens: encode is ordinary text
        name = "plain-bpe"

        def encode(self, text):
            return self.tokenize(text)

    with pytest.raises(ChatFormatError) as err:
        render_chat(CONVERSATIONS["system"], PlainTokenizer())
    assert "plain-bpe" in str(err.value) and "<|im_start|>" in str(err.value)
    assert "phi4" in str(err.value)  # the fix


# ----------------------------------------------------------------------------------------------
# Preprocessing


def read_docs(prefix):
    ds = IndexedDataset(str(prefix))
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: ds's memory map closes with it


def assert_no_output(prefix):
    leftovers = [p.name for p in Path(prefix).parent.iterdir()
                 if p.name.startswith(Path(prefix).name + ".")] if Path(prefix).parent.exists() \
        else []
    assert leftovers == [], leftovers


def test_sample_preprocesses_one_document_per_conversation(tmp_path):
    convs = sample_conversations()
    prefix = tmp_path / "out" / "faq"
    result = preprocess(SAMPLE_FILES, prefix, TOK, format="chat", workers=2, chunk_bytes=16384)
    rendered = [render_chat(parse_conversation(c), TOK) for c in convs]
    docs = read_docs(prefix)
    assert len(docs) == len(convs) == 178
    for doc, (ids, mask), conv in zip(docs, rendered, convs):
        assert doc.tolist() == ids + [EOD], conv["id"]
        assert loss_mask_from_ids(doc, TOK).tolist() == mask + [0], conv["id"]
    n_tokens = sum(len(ids) + 1 for ids, _ in rendered)
    assistant = sum(sum(mask) for _, mask in rendered)
    meta = read_meta(prefix)
    assert meta["kind"] == "chat" and dataset_kind(prefix) == "chat"
    assert (meta["documents"], meta["tokens"], meta["assistant_tokens"]) == (
        178, n_tokens, assistant)
    assert "json_key" not in meta and meta["inputs"] == [str(p) for p in SAMPLE_FILES]
    assert (result.documents, result.tokens, result.counts) == (
        178, n_tokens, {"assistant_tokens": assistant})
    assert result.summary().startswith(f"178 conversations, {n_tokens:,} tokens "
                                       f"({assistant:,} assistant tokens)")
    # the output does not depend on the number of workers
    preprocess(SAMPLE_FILES, tmp_path / "one", TOK, format="chat", workers=1)
    for kind in ("bin", "idx"):
        assert Path(dataset_paths(prefix)[kind]).read_bytes() == \
            Path(dataset_paths(tmp_path / "one")[kind]).read_bytes()


def test_kind_of_text_datasets_and_merging(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a document"}\n')
    preprocess([text], tmp_path / "text", TOK, workers=1)
    assert read_meta(tmp_path / "text")["kind"] == "text" == dataset_kind(tmp_path / "text")
    legacy = Path(dataset_paths(tmp_path / "text")["meta"])  # written before kinds existed
    meta = json.loads(legacy.read_text())
    del meta["kind"]
    legacy.write_text(json.dumps(meta))
    assert dataset_kind(tmp_path / "text") == "text"

    preprocess(SAMPLE_FILES[:1], tmp_path / "train", TOK, format="chat", workers=1)
    preprocess(SAMPLE_FILES[1:], tmp_path / "valid", TOK, format="chat", workers=1)
    preprocess(SAMPLE_FILES, tmp_path / "whole", TOK, format="chat", workers=1)
    merged = merge([tmp_path / "train", tmp_path / "valid"], tmp_path / "merged")
    meta, whole = read_meta(tmp_path / "merged"), read_meta(tmp_path / "whole")
    for key in ("kind", "documents", "tokens", "assistant_tokens", "inputs"):
        assert meta[key] == whole[key], key
    assert merged.counts == {"assistant_tokens": whole["assistant_tokens"]}
    with pytest.raises(PreprocessError, match="kind text.*kind chat|kind chat.*kind text"):
        merge([tmp_path / "train", tmp_path / "text"], tmp_path / "mixed")
    assert_no_output(tmp_path / "mixed")


def test_chat_arguments_are_checked(tmp_path):
    with pytest.raises(PreprocessError, match="applies to format 'text' only"):
        preprocess(SAMPLE_FILES[1:], tmp_path / "ds", TOK, format="chat", json_key="text")
    with pytest.raises(PreprocessError,
                       match="unknown format 'dpo'; formats are text, chat, preference"):
        preprocess(SAMPLE_FILES[1:], tmp_path / "ds", TOK, format="dpo")

    class PlainTokenizer(Phi4Tokenizer):
        def encode(self, text):
            return self.tokenize(text)

    with pytest.raises(PreprocessError, match="no special token <\\|im_start\\|>"):
        preprocess(SAMPLE_FILES[1:], tmp_path / "ds", PlainTokenizer(), format="chat")
    assert_no_output(tmp_path / "ds")


GOOD = json.dumps({"id": 0, "messages": [msg("user", "Q"), msg("assistant", "A")]})
BAD_LINES = {  # what goes on line 3, and what the error says about it
    "not_json": ('{"messages": [', "invalid JSON"),
    "no_messages": ('{"id": 3, "text": "hi"}', "no key 'messages' (keys: 'id', 'text')"),
    "unknown_role": (json.dumps({"messages": [msg("user", "Q"), msg("bot", "A")]}),
                     "message 2 has unknown role 'bot'; roles are system, user, assistant"),
    "content_not_a_string": (json.dumps({"messages": [{"role": "user", "content": 1.5},
                                                      msg("assistant", "A")]}),
                             "message 1 content is a number, not a string"),
    "no_assistant": (json.dumps({"messages": [msg("user", "Q")]}),
                     "no assistant message: nothing to train on"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_cli_bad_line_is_one_error_with_file_and_line(tmp_path, cli, case):
    bad, reason = BAD_LINES[case]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad, GOOD]) + "\n")
    code, out, err = cli("--format", "chat", "--input", path, "--output-prefix",
                         tmp_path / "out" / "ds", "--workers", "1")
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"preprocess_data: error: {path}:3: ")
    assert reason in errors[0] and "--skip-bad-lines" in errors[0]
    assert '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}' in errors[0]
    assert_no_output(tmp_path / "out" / "ds")


def test_cli_skip_bad_lines_counts_them(tmp_path, cli):
    path = tmp_path / "chat.jsonl"
    lines, kept = [], []
    for i in range(12):
        if i % 2:
            lines.append(sorted(BAD_LINES.values())[i // 2 % len(BAD_LINES)][0])
        else:
            conv = [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]
            lines.append(json.dumps({"id": i, "messages": conv}))
            kept.append(conv)
    path.write_text("\n".join(lines) + "\n")
    code, out, err = cli("--format", "chat", "--input", path, "--output-prefix",
                         tmp_path / "ds", "--skip-bad-lines", "--workers", "2")
    assert code == 0, err
    assert "6 conversations" in out and "6 bad lines skipped" in out
    assert read_meta(tmp_path / "ds")["skipped_lines"] == 6
    assert [d.tolist() for d in read_docs(tmp_path / "ds")] == [
        render_chat(conv, TOK)[0] + [EOD] for conv in kept]


def test_cli_json_key_does_not_apply_to_chat(tmp_path, cli):
    code, _, err = cli("--format", "chat", "--json-key", "text", "--input", SAMPLE_FILES[1],
                       "--output-prefix", tmp_path / "ds")
    assert code == 2 and err.count("error:") == 1
    assert "--json-key applies to --format text only" in err
    assert_no_output(tmp_path / "ds")
    code, _, err = cli("--merge", tmp_path / "a", "--format", "chat", "--output-prefix",
                       tmp_path / "m")
    assert code == 2 and "--format only apply with --input" in err


def test_cli_subprocess_writes_the_sample(tmp_path):
    """The real command line, as documented in examples/data/chat/README.md."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                           "--format", "chat", "--input", str(SAMPLE_FILES[1]),
                           "--output-prefix", "out/faq_valid", "--workers", "1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("preprocess_data: 18 conversations, ")
    assert dataset_kind(tmp_path / "out" / "faq_valid") == "chat"
    assert len(read_docs(tmp_path / "out" / "faq_valid")) == 18


# ----------------------------------------------------------------------------------------------
# The shipped sample


def test_shipped_sample_is_what_the_build_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_chat_sample",
                                                  REPO / "tools" / "build_chat_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for path in SAMPLE_FILES:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name

    train, valid = ([json.loads(line) for line in path.open(encoding="utf-8")]
                    for path in SAMPLE_FILES)
    assert (len(train), len(valid)) == (160, 18)
    ids = [c["id"] for c in train + valid]
    assert len(set(ids)) == 178 and all(i.startswith("pydoc-faq-") for i in ids)
    with_system = sum(c["messages"][0]["role"] == "system" for c in train + valid)
    assert 178 // 4 < with_system < 178 // 2
    for conv in train + valid:
        messages = parse_conversation(conv)
        assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
        assert messages[-2]["content"] and "\n" not in messages[-2]["content"]
        assert not messages[-1]["content"].startswith(("-", "\n"))
