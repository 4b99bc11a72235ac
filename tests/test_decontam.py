"""Decontamination (tools/decontaminate.py, megaphi/decontam/): planted cases through the CLI,
agreement with a plain-Python reference of Algorithm 1 (sets of word tuples, no hashing), shards,
a kill and a relaunch, gzip, the allow-list, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import decontaminate  # noqa: E402

# A 40-word item whose words are all distinct, so the 7-grams a paraphrase keeps are countable by
# hand: it has 34 distinct 7-grams.
LONG_ITEM = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike "
             "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
             "zulu apple banana cherry damson elder fig grape hazel iris jasmine kiwi lemon mango "
             "nutmeg").split()
SHORT_ITEM = "What is the capital city of the Kingdom of Bhutan"  # 10 words: 4 7-grams
GSM_ITEM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")
TEMPLATE = ("The following are multiple choice questions with answers about high school physics "
            "so please answer carefully")  # 17 words, in two items: boilerplate
FILLER = ("quiet rivers carve patient stones while distant orchards ripen slowly under amber "
          "skies and travellers rest beside the mossy wall near evening")  # 22 words


def paraphrase(every: int) -> str:
    """LONG_ITEM with every ``every``-th word replaced: runs of ``every - 1`` words survive."""
    words = [f"changed{i}" if (i + 1) % every == 0 else w for i, w in enumerate(LONG_ITEM)]
    return " ".join(words)


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_outputs(out: Path, gz: bool = False):
    result = {}
    for category in ("clean", "partial", "contaminated"):
        path = out / f"{category}.jsonl{'.gz' if gz else ''}"
        opener = gzip.open if gz else open
        with opener(path, "rt", encoding="utf-8") as f:
            result[category] = [json.loads(line) for line in f]
    return result


def by_id(outputs):
    return {r["id"]: r["decontamination"] for rs in outputs.values() for r in rs}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("decon")
    bench = write_jsonl(d / "bench.jsonl", [
        {"id": "long", "text": " ".join(LONG_ITEM)},
        {"id": "short", "text": SHORT_ITEM},
        {"id": "gsm", "text": GSM_ITEM},
        {"id": "physics-1", "text": f"{TEMPLATE} What is the unit of force"},
        {"id": "physics-2", "text": f"{TEMPLATE} Which quantity is conserved in collisions"},
    ])
    docs = {
        "verbatim": f"{FILLER} Natalia sold clips to 48 of her friends in April, and then she "
                    f"sold half as many clips. {FILLER}",
        "case_punct": f"{FILLER} NATALIA -- sold *clips* to 48 of HER friends... in april; AND "
                      f"then-she sold HALF as many {FILLER}",
        "short": f"{FILLER} Quiz: what is the capital city of the kingdom of Bhutan? {FILLER}",
        "para_high": f"{FILLER} {paraphrase(13)} {FILLER}",  # 18/34 7-grams kept
        "para_mid": f"{FILLER} {paraphrase(9)} {FILLER}",  # 8/34
        "para_low": f"{FILLER} {paraphrase(8)} {FILLER}",  # 5/34
        "boilerplate": f"{TEMPLATE}. {FILLER} The mitochondria is the powerhouse of the cell.",
        "clean": f"{FILLER} Nothing here comes from any benchmark at all.",
    }
    train = write_jsonl(d / "train.jsonl", [{"id": k, "text": v, "source": "web"}
                                           for k, v in docs.items()])
    reference = write_jsonl(d / "reference.jsonl", [
        {"text": f"Document {i}. {TEMPLATE}. {FILLER}"} for i in range(10)]
        + [{"text": f"{FILLER} only {i}"} for i in range(5)])
    return d, bench, train, reference


def run_cli(*argv) -> int:
    return decontaminate.main([str(a) for a in argv])


def test_planted_cases_get_their_categories(planted, capsys):
    d, bench, train, reference = planted
    allow = d / "allow.tsv"
    assert run_cli("allowlist", "--benchmark", bench, "--reference", reference, "--output", allow,
                   "--no-progress", "--workers", 1) == 0
    assert "are held by 10 or more reference documents" in capsys.readouterr().out
    assert run_cli("run", "--benchmark", bench, "--input", train, "--output-dir", d / "out",
                   "--allowlist", allow, "--no-progress", "--workers", 1) == 0
    printed = capsys.readouterr().out
    assert "3 clean, 1 partial, 4 contaminated" in printed
    got = by_id(read_outputs(d / "out"))
    assert got["verbatim"]["category"] == "contaminated"
    assert got["verbatim"]["stage"] == "13gram" and got["verbatim"]["item"] == "gsm"
    assert got["verbatim"]["ngram"] == ("natalia sold clips to 48 of her friends in april and "
                                         "then she")
    assert got["case_punct"]["category"] == "contaminated"
    assert got["case_punct"]["stage"] == "13gram"
    short = got["short"]
    assert (short["category"], short["stage"], short["item"]) == ("contaminated", "7gram", "short")
    assert short["ratio"] == 1.0 and short["item_7grams"] == 4
    assert got["para_high"]["category"] == "contaminated"
    assert got["para_high"]["stage"] == "7gram"
    assert got["para_high"]["ratio"] == round(18 / 34, 4)
    assert got["para_mid"]["category"] == "partial"
    assert got["para_mid"]["ratio"] == round(8 / 34, 4)
    assert got["para_low"]["category"] == "clean"
    assert got["para_low"]["ratio"] == round(5 / 34, 4)
    assert got["boilerplate"] == {"category": "clean"}
    assert got["clean"] == {"category": "clean"}
    outputs = read_outputs(d / "out")
    assert all(r["source"] == "web" for rs in outputs.values() for r in rs)  # fields kept
    report = json.loads((d / "out" / "report.json").read_text())
    assert report["per_benchmark"]["bench"]["docs_contaminated"] == 4
    assert report["per_benchmark"]["bench"]["items_contaminated"] == 3
    assert report["per_input"][str(train)]["contaminated"] == 4
    assert sum(report["ratio_histogram"]["documents"]) == 4  # docs with a 7-gram verdict

    # the thresholds move the paraphrases; without the allow-list the template is a 13-gram hit
    assert run_cli("run", "--benchmark", bench, "--input", train, "--output-dir", d / "out2",
                   "--info-7gram-threshold", 0.1, "--contaminated-7gram-threshold", 0.6,
                   "--no-progress", "--workers", 1) == 0
    got = by_id(read_outputs(d / "out2"))
    assert got["para_high"]["category"] == "partial"
    assert got["para_low"]["category"] == "partial"
    assert got["boilerplate"]["category"] == "contaminated"
    assert got["boilerplate"]["item"] == "physics-1"


def test_allowlist_holds_what_the_document_frequency_rule_says(planted):
    d, bench, train, reference = planted
    allow = d / "allow11.tsv"
    assert run_cli("allowlist", "--benchmark", bench, "--reference", reference, "--output",
                   allow, "--min-documents", 11, "--no-progress", "--workers", 1) == 0
    assert [x for x in allow.read_text().splitlines() if not x.startswith("#")] == []
    allow = d / "allow10.tsv"
    assert run_cli("allowlist", "--benchmark", bench, "--reference", reference, "--output",
                   allow, "--min-documents", 10, "--no-progress", "--workers", 1) == 0
    rows = [x.split("\t") for x in allow.read_text().splitlines() if not x.startswith("#")]
    template = TEMPLATE.lower().split()
    # every 13-gram and 7-gram of the 17-word template, in 10 reference documents each
    assert sorted(r[2] for r in rows if r[0] == "13") == sorted(
        " ".join(template[i:i + 13]) for i in range(len(template) - 12))
    assert len([r for r in rows if r[0] == "7"]) == len(template) - 6
    assert {r[1] for r in rows} == {"10"}
    assert "# normalization: lowercase" in allow.read_text()


def reference_words(text: str):
    return re.findall(r"[^\W_]+", text.lower())


def reference_algorithm(items, docs, allow, info, contaminated):
    """Algorithm 1 on sets of word tuples."""
    def grams(words, n):
        return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]

    item13 = [set(grams(reference_words(t), 13)) - allow for t in items]
    item7 = [set(grams(reference_words(t), 7)) - allow for t in items]
    out = []
    for text in docs:
        words = reference_words(text)
        verdict = None
        d13 = grams(words, 13)
        shared = [len(set(d13) & s) for s in item13]
        if max(shared, default=0):
            item = shared.index(max(shared))  # the most shared 13-grams, lowest index on ties
            first = next(g for g in d13 if g in item13[item])
            verdict = ("contaminated", "13gram", item, " ".join(first), max(shared))
        if verdict is None:
            d7 = set(grams(words, 7))
            best = (0.0, -1)
            for i, s in enumerate(item7):
                shared = len(d7 & s)
                if shared:
                    ratio = shared / min(len(d7), len(s))
                    if ratio > best[0]:
                        best = (ratio, i)
            if best[1] < 0:
                verdict = ("clean",)
            else:
                category = ("contaminated" if best[0] >= contaminated else
                            "partial" if best[0] >= info else "clean")
                verdict = (category, "7gram", best[1], round(best[0], 4))
        out.append(verdict)
    return out


def test_agrees_with_a_plain_python_reference_of_algorithm_1(tmp_path):
    """Random items and documents over a 40-word vocabulary (so 7-grams are shared often and
    13-grams sometimes), documents built from item pieces with edits; every verdict, item and
    ratio must equal the reference's."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    items = [" ".join(rng.choices(vocab, k=rng.randint(5, 40))) for _ in range(60)]
    template = " ".join(rng.choices(vocab, k=15))  # shared by ten items, as boilerplate is
    items[10:20] = [f"{template} {item}" for item in items[10:20]]
    docs = []
    for _ in range(300):
        words = rng.choices(vocab, k=rng.randint(0, 30))
        for _ in range(rng.randint(0, 3)):
            piece = rng.choice(items).split()
            a = rng.randint(0, len(piece))
            piece = piece[a:a + rng.randint(3, 20)]
            piece = [w if rng.random() > 0.08 else "edit" for w in piece]
            if rng.random() < 0.3:
                piece = [w.upper() + "," for w in piece]
            at = rng.randint(0, len(words))
            words[at:at] = piece
        docs.append(" ".join(words))
    allow_grams = {tuple(reference_words(items[0])[:7]), tuple(reference_words(items[1])[:13])}
    allow = tmp_path / "allow.tsv"
    allow.write_text("".join(f"{len(g)}\t0\t{' '.join(g)}\n" for g in allow_grams))
    bench = write_jsonl(tmp_path / "b.jsonl", [{"id": str(i), "text": t}
                                               for i, t in enumerate(items)])
    train = write_jsonl(tmp_path / "t.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs)])
    assert run_cli("run", "--benchmark", bench, "--input", train, "--output-dir",
                   tmp_path / "out", "--allowlist", allow, "--part-size", 0.004,
                   "--no-progress", "--workers", 2) == 0
    got = by_id(read_outputs(tmp_path / "out"))
    expected = reference_algorithm(items, docs, allow_grams, 0.2, 0.5)
    assert len(got) == len(docs)
    seen = {"13gram": 0, "partial": 0, "contaminated7": 0, "clean7": 0}
    for i, want in enumerate(expected):
        g = got[i]
        if want[0] == "clean" and len(want) == 1:
            assert g == {"category": "clean"}, i
            continue
        assert (g["category"], g["stage"], g["item"]) == (want[0], want[1], str(want[2])), i
        if want[1] == "13gram":
            assert (g["ngram"], g["shared_13grams"]) == (want[3], want[4])
            seen["13gram"] += 1
        else:
            assert g["ratio"] == want[3], i
            key = {"partial": "partial", "contaminated": "contaminated7"}.get(want[0], "clean7")
            seen[key] += 1
    assert min(seen.values()) >= 5, seen  # every path exercised
    assert len({got[i]["item"] for i, w in enumerate(expected)
                if w[1:2] == ("13gram",) and int(w[2]) in range(10, 20)}) > 2  # not just item 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 300 KB of documents, some carrying benchmark text, in plain and gzipped form."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    vocab = [f"word{i}" for i in range(3000)]
    items = [" ".join(rng.choices(vocab, k=rng.randint(8, 60))) for _ in range(200)]
    bench = write_jsonl(d / "bench.jsonl", [{"id": i, "text": t} for i, t in enumerate(items)])
    records = []
    for i in range(1500):
        text = " ".join(rng.choices(vocab, k=rng.randint(10, 60)))
        if i % 7 == 0:
            text += " " + rng.choice(items)
        records.append({"id": i, "text": text})
    train = write_jsonl(d / "train.jsonl", records)
    with open(train, "rb") as f, gzip.open(d / "train.jsonl.gz", "wb") as g:
        g.write(f.read())
    return d, bench, train


def test_three_shards_write_what_one_run_writes(corpus, tmp_path, monkeypatch, capsys):
    d, bench, train = corpus
    common = ["--benchmark", bench, "--input", train, "--part-size", 0.02, "--no-progress"]
    assert run_cli("run", *common, "--output-dir", tmp_path / "one", "--workers", 2) == 0
    for shard in (2, 0, 1):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(shard))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        assert run_cli("run", *common, "--output-dir", tmp_path / "three", "--workers", 1) == 0
        assert (tmp_path / "three" / "shards" / f"shard-{shard}-of-3.done").exists()
        assert (tmp_path / "three" / "report.json").exists() == (shard == 1)
    assert "the last shard to finish merges" in capsys.readouterr().out
    for name in ("clean.jsonl", "partial.jsonl", "contaminated.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    outputs = read_outputs(tmp_path / "one")
    ids = sorted(r["id"] for rs in outputs.values() for r in rs)
    assert ids == list(range(1500))  # every document exactly once
    assert len(outputs["contaminated"]) >= 150
    assert list((tmp_path / "one" / "parts").glob("*.jsonl")) == []  # merged, then removed


def test_gzipped_input_gives_gzipped_outputs_with_the_same_records(corpus, tmp_path):
    d, bench, train = corpus
    assert run_cli("run", "--benchmark", bench, "--input", d / "train.jsonl.gz",
                   "--output-dir", tmp_path / "gz", "--no-progress", "--workers", 1) == 0
    assert run_cli("run", "--benchmark", bench, "--input", train, "--output-dir",
                   tmp_path / "plain", "--no-progress", "--workers", 1) == 0
    assert read_outputs(tmp_path / "gz", gz=True) == read_outputs(tmp_path / "plain")


def test_a_killed_run_relaunched_completes_without_duplicates(corpus, tmp_path):
    d, bench, train = corpus
    cmd = [sys.executable, str(REPO / "tools" / "decontaminate.py"), "run", "--benchmark",
           str(bench), "--input", str(train), "--part-size", "0.001", "--workers", "1",
           "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "out" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.json"))) < 20:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.json")))
    assert 20 <= done < 300, done  # killed part-way (300 parts in all)
    assert not (tmp_path / "out" / "clean.jsonl").exists()  # nothing looks complete
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {done} of this shard's" in rerun.stderr
    assert run_cli("run", "--benchmark", bench, "--input", train, "--output-dir",
                   tmp_path / "ref", "--part-size", 0.001, "--no-progress", "--workers", 1) == 0
    for name in ("clean.jsonl", "partial.jsonl", "contaminated.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert list((tmp_path / "out" / "parts").glob("*.tmp")) == []


def test_bad_input_is_one_error_line(corpus, tmp_path, capsys):
    d, bench, train = corpus
    lines = train.read_text().splitlines()
    lines[1000] = '{"id": "broken", "text": '
    lines[1200] = '{"id": "no text"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")

    def error(*argv) -> str:
        assert run_cli(*argv, "--no-progress", "--workers", 1) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("decontaminate: error: "), err
        return err[0]

    common = ["run", "--benchmark", bench, "--part-size", 0.01]
    # a bad line deep in the file (in a later part) is named by its line number
    msg = error(*common, "--input", bad, "--output-dir", tmp_path / "o1")
    assert f"{bad}:1001: not JSON" in msg and "--skip-bad-lines" in msg
    assert not (tmp_path / "o1" / "clean.jsonl").exists()
    assert run_cli(*common, "--input", bad, "--output-dir", tmp_path / "o1", "--skip-bad-lines",
                   "--no-progress", "--workers", 1) == 0
    assert "2 bad lines skipped" in capsys.readouterr().out
    report = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert report["totals"]["skipped"] == 2
    assert report["skipped_where"] == [f"{bad}:1001", f"{bad}:1201"]
    assert (tmp_path / "o1" / "skipped.txt").read_text().splitlines() == [lines[1000],
                                                                          lines[1200]]
    assert sum(report["totals"][c] for c in ("clean", "partial", "contaminated")) == 1498

    nofield = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "question": "x"}])
    msg = error(*common[:2], nofield, "--input", train, "--output-dir", tmp_path / "o2")
    assert f"{nofield}:1: no field 'text'" in msg and "--benchmark-field" in msg
    assert not (tmp_path / "o2").exists()  # refused before any work
    msg = error(*common, "--input", train, "--text-field", "body", "--output-dir", tmp_path / "o3")
    assert f"{train}:1: no field 'body'" in msg
    msg = error(*common, "--input", tmp_path / "missing.jsonl", "--output-dir", tmp_path / "o4")
    assert "missing.jsonl: no such file" in msg
    msg = error(*common, "--input", train, "--output-dir", tmp_path / "o5",
                "--info-7gram-threshold", 0.6)
    assert "--info-7gram-threshold (0.6) <= --contaminated-7gram-threshold (0.5)" in msg
    allow = tmp_path / "allow.tsv"
    allow.write_text("# normalization: case kept; words: runs of non-whitespace\n")
    msg = error(*common, "--input", train, "--output-dir", tmp_path / "o6", "--allowlist", allow)
    assert "rebuild it with the same" in msg
    # a relaunch into a directory with other settings
    msg = error(*common, "--input", train, "--output-dir", tmp_path / "o1")
    assert "holds a run with other inputs" in msg


def test_keep_punctuation_and_keep_case(tmp_path):
    item = "Hello, World! this item has exactly thirteen words in it for the test"
    bench = write_jsonl(tmp_path / "b.jsonl", [{"text": item}])
    train = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "same", "text": item},
        {"id": "lower", "text": item.lower()},
        {"id": "nopunct", "text": item.replace(",", "").replace("!", "")}])
    results = {}
    for flags in ([], ["--keep-case"], ["--keep-punctuation"]):
        out = tmp_path / ("out" + "".join(flags))
        assert run_cli("run", "--benchmark", bench, "--input", train, "--output-dir", out,
                       "--no-progress", "--workers", 1, *flags) == 0
        got = by_id(read_outputs(out))
        results[tuple(flags)] = {k: v.get("stage") for k, v in got.items()}
    # a 13-gram match needs the same words; the 7-grams away from the changed words still match
    assert results[()] == {"same": "13gram", "lower": "13gram", "nopunct": "13gram"}
    assert results[("--keep-case",)] == {"same": "13gram", "lower": "7gram",
                                         "nopunct": "13gram"}
    assert results[("--keep-punctuation",)] == {"same": "13gram", "lower": "13gram",
                                                "nopunct": "7gram"}
