"""Preprocessing JSON lines into Megatron-Core indexed datasets (megaphi.data.preprocess)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaphi.data.preprocess import PreprocessError, merge, preprocess, read_meta
from megaphi.data.tokenizer import Phi4Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOK = Phi4Tokenizer()
EOD = TOK.eod_id

TEXTS_A = [
    "Hello, world.",
    "Unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 😀🚀, and a tab\there.",
    "",
    "A document that mentions <|endoftext|> and <|im_end|> as plain text.",
    "line one\nline two\n\nline four " * 20,
]
TEXTS_B = ["Second file, first doc.", "Second file, second doc: ünïcödé ∑∫√.", "x" * 3000]
TEXTS_C = ["Third file is gzip without a .gz suffix.", "Its last line has no newline."]


def write_jsonl(path: Path, texts, *, gz=False, blank_lines=True, crlf=False, final_newline=True):
    newline = "\r\n" if crlf else "\n"
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"id": i, "text": text}, ensure_ascii=i % 2 == 0))
        if blank_lines and i == 1:
            lines.append("   ")  # blank lines are skipped silently
    data = (newline.join(lines) + (newline if final_newline else "")).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def corpus(tmp_path):
    """Three inputs: plain (CRLF), .gz, and gzip content under a .jsonl name; expected docs."""
    inputs = [write_jsonl(tmp_path / "a.jsonl", TEXTS_A, crlf=True),
              write_jsonl(tmp_path / "b.jsonl.gz", TEXTS_B, gz=True),
              write_jsonl(tmp_path / "c.jsonl", TEXTS_C, gz=True, final_newline=False)]
    expected = [TOK.tokenize(t) + [EOD] for t in TEXTS_A + TEXTS_B + TEXTS_C]
    return inputs, expected


def dataset_files(prefix):
    return [Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "meta.json")]


def read_docs(prefix):
    ds = IndexedDataset(str(prefix))
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def assert_no_output(prefix):
    leftovers = [p.name for p in Path(prefix).parent.iterdir()
                 if p.name.startswith(Path(prefix).name + ".")]
    assert leftovers == [], leftovers


def test_round_trip_identical_for_any_worker_count(tmp_path, corpus):
    inputs, expected = corpus
    one = preprocess(inputs, tmp_path / "out1" / "ds", TOK, workers=1)
    # tiny chunks with 2 workers: many chunks in flight, results must come back in order
    two = preprocess(inputs, tmp_path / "out2" / "ds", TOK, workers=2, chunk_bytes=64)

    assert read_docs(tmp_path / "out1" / "ds") == expected
    for a, b in zip(dataset_files(one.prefix), dataset_files(two.prefix)):
        if a.suffix != ".json":
            assert a.read_bytes() == b.read_bytes(), a.name
    # <|endoftext|> in a text is plain text: the only eod of that document is the appended one
    special = expected[3]
    assert special[-1] == EOD and EOD not in special[:-1] and TOK.eos_id not in special
    assert expected[2] == [EOD]  # the empty text is a document of just its eod

    n_tokens = sum(map(len, expected))
    assert (one.documents, one.tokens, one.skipped_lines) == (len(expected), n_tokens, 0)
    assert (two.documents, two.tokens) == (one.documents, one.tokens)
    assert one.bytes_written == sum(p.stat().st_size for p in dataset_files(one.prefix)[:2])
    meta = read_meta(tmp_path / "out1" / "ds")
    assert meta == {"format": "megaphi-indexed-v1", "kind": "text", "tokenizer": TOK.describe(),
                    "documents": len(expected), "tokens": n_tokens, "skipped_lines": 0,
                    "inputs": [str(p) for p in inputs], "json_key": "text", "dtype": "int32"}
    assert IndexedDataset(str(tmp_path / "out1" / "ds")).index.dtype.__name__ == "int32"
    assert not list(tmp_path.rglob("*.tmp"))


def test_other_json_key(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"content": "hi there", "text": 3}\n')
    preprocess([path], tmp_path / "ds", TOK, json_key="content", workers=1)
    assert read_docs(tmp_path / "ds") == [TOK.tokenize("hi there") + [EOD]]


BAD_LINES = {  # what goes on line 3, and what the error says about it
    "invalid_json": ('{"text": "unterminated', "invalid JSON"),
    "missing_key": ('{"body": "no text key"}', "no key 'text'"),
    "not_a_string": ('{"text": ["a", "list"]}', "is an array, not a string"),
    "not_an_object": ('"just a string"', "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line(tmp_path, case):
    bad, reason = BAD_LINES[case]
    path = tmp_path / "in.jsonl"
    good = [json.dumps({"text": f"doc {i}"}) for i in range(40)]
    path.write_text("\n".join(good[:2] + [bad] + good[2:]) + "\n")
    prefix = tmp_path / "out" / "ds"
    with pytest.raises(PreprocessError) as err:
        preprocess([path], prefix, TOK, workers=2, chunk_bytes=32)
    message = str(err.value)
    assert f"{path}:3: " in message and reason in message
    assert "--skip-bad-lines" in message and "--json-key" in message
    assert_no_output(prefix)


def test_skip_bad_lines_counts_them(tmp_path):
    path = tmp_path / "in.jsonl"
    lines, kept = [], []
    for i in range(30):
        if i % 7 == 3:
            lines.append(list(BAD_LINES.values())[i % 4][0])
        else:
            lines.append(json.dumps({"text": f"document number {i}"}))
            kept.append(f"document number {i}")
    lines.insert(5, "")
    path.write_text("\n".join(lines) + "\n")
    result = preprocess([path], tmp_path / "ds", TOK, workers=2, chunk_bytes=100,
                        skip_bad_lines=True)
    n_bad = 30 - len(kept)
    assert result.skipped_lines == n_bad == 4
    assert f"{n_bad:,} bad lines skipped" in result.summary()
    assert read_meta(tmp_path / "ds")["skipped_lines"] == n_bad
    assert read_docs(tmp_path / "ds") == [TOK.tokenize(t) + [EOD] for t in kept]


class FailingTokenizer(Phi4Tokenizer):
    """Phi-4, but tokenize raises ``error`` at its ``fail_at``-th call in a process."""

    def __init__(self, fail_at: int, error: type = RuntimeError):
        super().__init__()
        self.fail_at, self.error, self.calls = fail_at, error, 0

    def __reduce__(self):
        return (FailingTokenizer, (self.fail_at, self.error))

    def tokenize(self, text):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.error(f"tokenizer failed at call {self.calls}")
        return super().tokenize(text)


@pytest.mark.parametrize("workers,error", [(1, KeyboardInterrupt), (2, RuntimeError)])
def test_interrupted_run_leaves_earlier_output_untouched(tmp_path, workers, error):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(200)))
    prefix = tmp_path / "out" / "ds"
    preprocess([path], prefix, TOK, workers=1)
    before = {p.name: p.read_bytes() for p in dataset_files(prefix)}

    # fails mid-way: many chunks have been written to the temp files by then
    with pytest.raises(error, match="tokenizer failed"):
        preprocess([path], prefix, FailingTokenizer(fail_at=60, error=error), workers=workers,
                   chunk_bytes=512)
    assert {p.name: p.read_bytes() for p in dataset_files(prefix)} == before
    assert not list(tmp_path.rglob("*.tmp"))

    fresh = tmp_path / "fresh" / "ds"
    with pytest.raises(error):
        preprocess([path], fresh, FailingTokenizer(fail_at=60, error=error), workers=workers,
                   chunk_bytes=512)
    assert_no_output(fresh)


class SmallVocabTokenizer:
    """A 1,000-id vocabulary (stored as uint16) whose tokenize returns ids past it for 'bad'."""

    vocab_size, eod_id = 1000, 999

    def tokenize(self, text):
        return [70000 if text == "overflow" else 1000 if text == "bad" else 5] * 2

    def describe(self):
        return {"name": "small", "vocab_size": 1000, "eod_id": 999, "fingerprint": "small"}


@pytest.mark.parametrize("text,bad_id", [("bad", 1000), ("overflow", 70000)])
def test_ids_outside_the_vocabulary_are_refused(tmp_path, text, bad_id):
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"text": "ok"}}\n{{"text": "{text}"}}\n')
    with pytest.raises(PreprocessError, match=f"produced id {bad_id} .* vocabulary of 1000"):
        preprocess([path], tmp_path / "ds", SmallVocabTokenizer(), workers=1)
    assert_no_output(tmp_path / "ds")
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n')
    preprocess([path], tmp_path / "ds", SmallVocabTokenizer(), workers=1)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds.index.dtype.__name__ == "uint16" and ds[0].tolist() == [5, 5, 999]


def test_merge_equals_preprocessing_the_concatenation(tmp_path, corpus):
    inputs, expected = corpus
    preprocess(inputs[:1], tmp_path / "part0", TOK, workers=1)
    preprocess(inputs[1:], tmp_path / "part1", TOK, workers=2)
    preprocess(inputs, tmp_path / "whole", TOK, workers=1)
    result = merge([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged" / "ds")

    for a, b in zip(dataset_files(tmp_path / "whole"), dataset_files(tmp_path / "merged" / "ds")):
        if a.suffix != ".json":
            assert a.read_bytes() == b.read_bytes(), a.name
    assert read_docs(tmp_path / "merged" / "ds") == expected
    meta, whole = read_meta(tmp_path / "merged" / "ds"), read_meta(tmp_path / "whole")
    for key in ("tokenizer", "documents", "tokens", "inputs", "skipped_lines", "json_key"):
        assert meta[key] == whole[key], key
    assert (result.documents, result.tokens) == (whole["documents"], whole["tokens"])


class OtherVocabTokenizer(Phi4Tokenizer):
    @property
    def fingerprint(self):
        return "0123456789abcdef"


def test_merge_refuses_different_tokenizers(tmp_path, corpus):
    inputs, _ = corpus
    preprocess(inputs[:1], tmp_path / "phi4", TOK, workers=1)
    preprocess(inputs[:1], tmp_path / "other", OtherVocabTokenizer(), workers=1)
    with pytest.raises(PreprocessError, match="different tokenizers") as err:
        merge([tmp_path / "phi4", tmp_path / "other"], tmp_path / "merged")
    assert "0123456789abcdef" in str(err.value) and TOK.fingerprint in str(err.value)
    assert_no_output(tmp_path / "merged")


def test_read_meta_names_the_file(tmp_path):
    with pytest.raises(PreprocessError, match=r"missing\.meta\.json does not exist"):
        read_meta(tmp_path / "missing")
    (tmp_path / "broken.meta.json").write_text("{not json")
    with pytest.raises(PreprocessError, match=r"broken\.meta\.json is not readable JSON"):
        read_meta(tmp_path / "broken")


def test_missing_input_is_one_error_before_any_work(tmp_path):
    with pytest.raises(PreprocessError, match="nope.jsonl does not exist"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "out" / "ds", TOK)
    assert not (tmp_path / "out").exists()


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli(tmp_path, corpus):
    inputs, expected = corpus
    proc = run_cli("--input", *map(str, inputs), "--output-prefix", "out/ds", "--workers", "2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(expected):,} documents, {sum(map(len, expected)):,} tokens" in proc.stdout
    assert read_docs(tmp_path / "out" / "ds") == expected

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 1}\n')
    proc = run_cli("--input", str(bad), "--output-prefix", "out/bad", cwd=tmp_path)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert error_lines == [f"preprocess_data: error: {bad}:2: the value of 'text' is a number, "
                           "not a string; each line must be a JSON object with a string under "
                           "'text': fix the line, choose the key with --json-key, or pass "
                           "--skip-bad-lines to skip such lines"]
    assert "Traceback" not in proc.stderr
    assert_no_output(tmp_path / "out" / "bad")

    proc = run_cli("--input", "missing.jsonl", "--output-prefix", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("preprocess_data: error: input file missing.jsonl does not "
                                   "exist; check the path")
