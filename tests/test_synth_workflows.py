"""megaphi-synth workflows on a scripted OpenAI-compatible server (deterministic answers and
injected faults): plurality-vote thresholds, judge pairs and their gap, failures recorded and
retried, kill and rerun with each record once, a rerun from the cache with zero requests, and
bad input refused before any request."""

import json
import re
import subprocess
import sys
import time

import pytest

from distributed import ROOT, worker_env
from scripted_llm import MODEL, ScriptedLLM

pytest.importorskip("fastapi")
SYNTH = ROOT / "examples" / "synth"

# plurality_vote: the answers to each question, by choice index (8 samples)
VOTES = {"easy": ["4"] * 8,                      # unanimous: dropped
         "hard": ["1", "2", "3", "4", "1", "2", "3", "4"],  # no majority: dropped
         "tie": ["5"] * 4 + ["6"] * 4,            # 4 of 8 is not more than half: dropped
         "good": ["7"] * 5 + ["8"] * 3,           # majority 7 (5 of 8): kept
         "words": ["x = 9.", "9", "$9$", "9", "9", "10", "none", "9"],  # 9 by 6: kept
         # as strings a 3-3-2 split (dropped); as math (math-verify) 1/2 by 5 of 8: kept
         "forms": ["\\frac{1}{2}"] * 3 + ["0.5", "3", "3", "0.5", "3"]}


def responder(messages, body, k):
    text = messages[-1]["content"]
    for key, answers in VOTES.items():
        if f"PROBLEM {key}" in text:
            answer = answers[k]
            if answer == "none":
                return "I cannot solve this."
            return f"Let me think. The answer is {answer}" if "=" in answer or "$" in answer \
                else f"Some reasoning, then \\boxed{{{answer}}}."
    if text.startswith("You are grading"):  # the judge: the score is in the response
        found = re.search(r"quality (\d+)", text)
        return f"Reasoning.\nScore: {found.group(1)}" if found else "No score here."
    if "PROMPT" in text:  # the policy's k-th answer to a judge_pairs prompt
        qualities = {"PROMPT wide": [2, 9, 5, 4], "PROMPT narrow": [5, 6, 7, 6],
                     "PROMPT unscored": [None, 8, None, None]}
        for key, q in qualities.items():
            if key in text:
                return f"answer {k} of quality {q[k]}" if q[k] is not None else f"answer {k}"
    return more(text)


@pytest.fixture(scope="module")
def server():
    with ScriptedLLM(responder, latency_s=0.0) as s:
        yield s


def synth(server, workflow, inp, out, *extra, timeout=120):
    cmd = [sys.executable, "-m", "megaphi.synth.cli", "run", str(SYNTH / workflow), "--input",
           str(inp), "--output", str(out), "--endpoint", server.url, "--model", MODEL,
           "--no-progress", *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=worker_env())


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plurality_vote_keeps_majorities_only(server, tmp_path):
    write(tmp_path / "q.jsonl", [{"id": k, "question": f"PROBLEM {k}"} for k in VOTES])
    proc = synth(server, "plurality_vote.yaml", tmp_path / "q.jsonl", tmp_path / "out.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["items"], summary["kept"], summary["dropped"], summary["failed"]) == (
        6, 3, 3, 0)
    got = {r["id"]: r for r in lines(tmp_path / "out.jsonl")}
    assert set(got) == {"good", "words", "forms"}
    assert got["forms"]["answer"] == "\\frac{1}{2}" and got["forms"]["agreement"] == 5 / 8
    assert got["forms"]["votes"] == {"\\frac{1}{2}": 3, "0.5": 2, "3": 3}
    assert got["good"]["answer"] == "7" and got["good"]["agreement"] == 5 / 8
    assert got["words"]["answer"] == "9" and got["words"]["votes"] == {"9": 6, "10": 1}
    assert got["good"]["type"] == "math" and got["good"]["question"] == "PROBLEM good"
    prov = got["good"]["provenance"]
    assert prov["workflow"] == "plurality_vote" and len(prov["requests"]) == 1
    request = prov["requests"][0]
    assert request["step"] == "answer" and request["model"] == MODEL
    assert request["sampling"]["n"] == 8 and request["template"] == "plurality_vote_answer"
    assert len(request["template_sha256"]) == 64 and len(request["output"]) == 8
    assert request["attempts"] == 1 and request["usage"]["completion_tokens"] > 0
    # the output is a questions file of Pivotal Token Search
    from megaphi.pts.run import load_questions

    assert sorted(q["id"] for q in load_questions(str(tmp_path / "out.jsonl"))) == [
        "forms", "good", "words"]


def test_judge_pairs_respect_the_gap_and_preprocess(server, tmp_path, cli):
    write(tmp_path / "p.jsonl", [{"id": k, "prompt": f"PROMPT {k}"}
                                 for k in ("wide", "narrow", "unscored")])
    proc = synth(server, "judge_pairs.yaml", tmp_path / "p.jsonl", tmp_path / "pairs.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pair,) = lines(tmp_path / "pairs.jsonl")  # narrow: gap 2 < 3; unscored: one score
    assert pair["id"] == "wide" and pair["gap"] == 7.0 and pair["scores"] == [2, 9, 5, 4]
    assert pair["chosen"] == "answer 1 of quality 9" and pair["rejected"] == "answer 0 of " \
                                                                             "quality 2"
    steps = [r["step"] for r in pair["provenance"]["requests"]]
    assert steps == ["respond"] + ["judge"] * 4
    code, out, err = cli("--format", "preference", "--input", tmp_path / "pairs.jsonl",
                         "--output-prefix", tmp_path / "pairs")
    assert code == 0, err
    assert json.loads((tmp_path / "pairs.meta.json").read_text())["full_pairs"] == 1


def test_the_judge_step_can_go_to_another_endpoint_and_model(server, tmp_path):
    """Phi-4's DPO round 2: the policy answers, another model (GPT-4o there) judges. Here a
    second scripted server serving "judge" gets every judge request and the policy's none."""
    write(tmp_path / "p.jsonl", [{"id": "wide", "prompt": "PROMPT wide"}])
    with ScriptedLLM(responder, model="judge") as judge:
        before = server.requests
        proc = synth(server, "judge_pairs.yaml", tmp_path / "p.jsonl", tmp_path / "pairs.jsonl",
                     "--step-endpoint", f"judge={judge.url}", "--step-model", "judge=judge")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (server.requests - before, judge.requests) == (1, 4)
        bad = synth(server, "judge_pairs.yaml", tmp_path / "p.jsonl", tmp_path / "o.jsonl",
                    "--step-model", "grade=judge")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "megaphi-synth: error: --step-model 'grade=judge': this workflow's steps are respond, "
        "judge")
    (pair,) = lines(tmp_path / "pairs.jsonl")
    assert pair["chosen"] == "answer 1 of quality 9" and pair["gap"] == 7.0
    models = [(r["step"], r["model"]) for r in pair["provenance"]["requests"]]
    assert models == [("respond", MODEL)] + [("judge", "judge")] * 4
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 5  # both endpoints' requests


def test_failures_are_recorded_counted_and_retried_by_the_next_run(server, tmp_path):
    write(tmp_path / "q.jsonl", [{"id": f"g{i}", "question": f"PROBLEM good {i}"}
                                 for i in range(4)])
    server.faults["Solve the following problem. Reason step by step, then give the final "
                  "answer as \\boxed{ANSWER}.\n\nPROBLEM good 2\n"] = ["always500"]
    first = synth(server, "plurality_vote.yaml", tmp_path / "q.jsonl", tmp_path / "o.jsonl",
                  "--max-retries", "1")
    assert first.returncode == 1, first.stderr[-3000:]  # the run finishes, and says so
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 1 and summary["kept"] == 3
    (failure,) = lines(tmp_path / "o.jsonl.failures.jsonl")
    assert failure["input_id"] == "g2" and failure["error"] == "answer: HTTP 500: boom"
    assert failure["provenance"][0]["attempts"] == 2
    assert not (tmp_path / "o.jsonl.done").exists()
    server.faults.clear()
    before = server.requests
    second = synth(server, "plurality_vote.yaml", tmp_path / "q.jsonl", tmp_path / "o.jsonl")
    assert second.returncode == 0, second.stderr[-3000:]
    assert server.requests == before + 1  # only the failed item, the rest done
    assert sorted(r["id"] for r in lines(tmp_path / "o.jsonl")) == ["g0", "g1", "g2", "g3"]
    assert (tmp_path / "o.jsonl.done").exists()


def test_killed_run_resumes_each_record_once_and_a_rerun_is_free(tmp_path):
    items = [{"id": f"q{i}", "question": f"PROBLEM good {i}"} for i in range(24)]
    write(tmp_path / "q.jsonl", items)
    with ScriptedLLM(responder, latency_s=0.25) as slow:
        def command(out, *extra):
            return [sys.executable, "-m", "megaphi.synth.cli", "run",
                    str(SYNTH / "plurality_vote.yaml"), "--input", str(tmp_path / "q.jsonl"),
                    "--output", str(out), "--endpoint", slow.url, "--model", MODEL,
                    "--no-progress", "--concurrency", "2", *extra]

        cmd = command(tmp_path / "o.jsonl")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        progress = tmp_path / "o.jsonl.progress.jsonl"
        deadline = time.time() + 120
        while not (progress.exists() and len(progress.read_text().splitlines()) >= 4):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        done_before = len(progress.read_text().splitlines())
        assert done_before < 24
        made = slow.requests
        rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=worker_env(),
                               timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert json.loads(rerun.stdout.strip().splitlines()[-1])["done_before"] >= done_before
        ids = [r["id"] for r in lines(tmp_path / "o.jsonl")]
        assert sorted(ids) == sorted(i["id"] for i in items)  # each exactly once
        assert slow.requests - made <= 24 - done_before  # the finished ones were not redone
        # the same run again, into a new output: every answer from the cache
        before = slow.requests
        again = subprocess.run(command(tmp_path / "o2.jsonl", "--cache",
                                       tmp_path / "o.jsonl.cache.sqlite"),
                               capture_output=True, text=True, cwd=ROOT, env=worker_env(),
                               timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert slow.requests == before
        summary = json.loads(again.stdout.strip().splitlines()[-1])
        assert summary["requests"] == 0 and summary["cache_hits"] == 24
        assert sorted(x.read_text().count("\n") for x in (tmp_path / "o.jsonl",
                                                            tmp_path / "o2.jsonl")) == [24, 24]


def test_bad_input_is_one_error_before_any_request(server, tmp_path):
    from megaphi.platform import free_port

    write(tmp_path / "q.jsonl", [{"id": 1, "question": "PROBLEM good"}])
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "question": "x"}\n{"id": 2, "quest\n')
    write(tmp_path / "noq.jsonl", [{"id": 1, "question": "x"}, {"id": 2, "text": "y"}])
    (tmp_path / "eq.yaml").write_text(
        (SYNTH / "plurality_vote.yaml").read_text().replace(
            "plurality_vote_answer.txt", str(SYNTH / "plurality_vote_answer.txt"))
        + "  equivalence: sympy\n")
    before = server.requests
    cases = [(("plurality_vote.yaml", tmp_path / "bad.jsonl"), r"bad\.jsonl:2: not JSON"),
             (("plurality_vote.yaml", tmp_path / "noq.jsonl"),
              r"noq\.jsonl:2: template plurality_vote_answer needs \{question\}"),
             (("nope.yaml", tmp_path / "q.jsonl"), r"nope\.yaml: No such file"),
             ((tmp_path / "eq.yaml", tmp_path / "q.jsonl"),
              r"eq\.yaml: settings\.equivalence must be math or string, got 'sympy'")]
    for (workflow, inp), message in cases:
        proc = synth(server, workflow, inp, tmp_path / "out.jsonl")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr
        assert "Traceback" not in proc.stderr
    assert server.requests == before and not (tmp_path / "out.jsonl").exists()

    class Down:
        url = f"http://127.0.0.1:{free_port()}/v1"
    proc = synth(Down, "plurality_vote.yaml", tmp_path / "q.jsonl", tmp_path / "out.jsonl",
                 "--max-retries", "0", "--timeout", "5")
    assert proc.returncode == 2 and "is unreachable" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def more(text):
    """The answers of seed curation, self-revision and instruction reversal."""
    if text.startswith("Rate the educational value"):
        return "Fine.\nScore: 8" if "GOODPAGE" in text else "Spam.\nScore: 3"
    if text.startswith("Rate the following passage"):
        rich = "rich" in text
        return (f"Notes.\nFactual: {8 if rich else 2}\nReasoning: {7 if rich else 6}\n"
                f"Complexity: {'high' if rich else 'low'}\nObscurity: low")
    if text.startswith("Critique the response"):  # passes once the response is version 2
        return "Good.\nVerdict: PASS" if "version 2" in text else "Too short.\nVerdict: REVISE"
    if text.startswith("Rewrite the response"):
        version = int(re.search(r"Response:\n.*version (\d+)", text).group(1))
        return f"answer, version {version + 1}"
    if text.startswith("TASK"):  # a self-revision draft
        return "answer, version 0"
    if text.startswith("Here is a Python program"):
        return "Write " + re.search(r"def (\w+)", text).group(1) + " of two numbers."
    if text.startswith("Write add"):  # regenerated right, with other names
        return "Sure:\n```python\ndef add(x, y):\n    return x + y\n```"
    if text.startswith("Write sub"):  # regenerated wrong
        return "```python\ndef sub(a, b):\n    return b - a\n```"
    if text.startswith("Write mul"):  # no tests: compared by normalised AST
        return '```python\ndef mul(p, q):\n    """Product."""\n    return p * q\n```'
    if text.startswith("Write div"):
        return "```python\nimport math\ndef div(a, b):\n    return math.floor(a / b) + 0\n```"
    return "echo: " + text


def run_inprocess(server, workflow, records, out, **settings):
    """The runner in this process (the CLI is covered above)."""
    import asyncio

    from megaphi.synth.client import ChatClient
    from megaphi.synth.workflow import WorkflowSpec, run_workflow

    spec = WorkflowSpec.load(str(SYNTH / workflow))
    spec.settings.update(settings)
    client = ChatClient(server.url, MODEL, api_key_env=None, backoff_base=0.01)
    inputs = [{**r, "_where": f"in.jsonl:{k + 1}"} for k, r in enumerate(records)]

    async def go():
        try:
            return await run_workflow(spec, inputs, client, str(out), progress=False)
        finally:
            await client.close()
    summary = asyncio.run(go())
    return summary, lines(out) if out.exists() else []


def test_seed_curation_keeps_good_pages_and_rich_passages(server, tmp_path):
    page = "GOODPAGE intro.\n\nA rich passage about tides.\n\nA thin one.\n\nAnother rich one."
    summary, out = run_inprocess(server, "seed_curation.yaml",
                                 [{"id": "p1", "text": page},
                                  {"id": "p2", "text": "BADPAGE rich rich"}],
                                 tmp_path / "seeds.jsonl", passage_chars=20)
    assert (summary["kept"], summary["dropped"]) == (1, 1)
    assert [r["id"] for r in out] == ["p1/1", "p1/3"]
    assert out[0]["text"] == "A rich passage about tides."
    assert out[0]["scores"] == {"page": 8.0, "factual": 8.0, "reasoning": 7.0}
    assert out[0]["tags"] == {"complexity": "high", "obscurity": "low"}
    assert summary["requests"] == 2 + 4  # two pages, then the good one's four passages


def test_self_revision_stops_when_the_critique_passes(server, tmp_path):
    summary, out = run_inprocess(server, "self_revision.yaml", [{"id": "t", "prompt": "TASK"}],
                                 tmp_path / "rev.jsonl")
    (record,) = out
    assert record["passed"] and [r["verdict"] for r in record["rounds"]] == [
        "revise", "revise", "pass"]
    assert record["messages"][1]["content"] == "answer, version 2"
    steps = [q["step"] for q in record["provenance"]["requests"]]
    assert steps == ["draft", "critique", "revise", "critique", "revise", "critique"]
    summary, out = run_inprocess(server, "self_revision.yaml", [{"id": "t", "prompt": "TASK"}],
                                 tmp_path / "rev1.jsonl", max_rounds=1)
    assert out == [] and summary["dropped"] == 1  # not passed within one round
    summary, out = run_inprocess(server, "self_revision.yaml", [{"id": "t", "prompt": "TASK"}],
                                 tmp_path / "rev2.jsonl", max_rounds=1, keep_unpassed=True)
    assert not out[0]["passed"] and len(out[0]["rounds"]) == 2


def test_instruction_reversal_keeps_round_trips_that_pass_the_tests(server, tmp_path):
    records = [{"id": "add", "code": "def add(a, b):\n    return a + b",
                "tests": "assert add(2, 3) == 5"},
               {"id": "sub", "code": "def sub(a, b):\n    return a - b",
                "tests": "assert sub(5, 3) == 2"},
               {"id": "mul", "code": "def mul(a, b):\n    return a * b"},
               {"id": "div", "code": "def div(a, b):\n    return a // b"}]
    summary, out = run_inprocess(server, "instruction_reversal.yaml", records,
                                 tmp_path / "rev.jsonl")
    got = {r["id"]: r for r in out}
    assert set(got) == {"add", "mul"}  # sub fails its tests; div is too far from the code
    assert got["add"]["fidelity"]["method"] == "tests" and got["add"]["fidelity"]["passed"]
    assert got["add"]["instruction"] == "Write add of two numbers."
    assert got["add"]["messages"] == [{"role": "user", "content": "Write add of two numbers."},
                                      {"role": "assistant", "content": records[0]["code"]}]
    assert got["mul"]["fidelity"] == {"method": "ast_similarity", "score": 1.0,
                                      "threshold": 0.8}
    assert list(got["add"])[:2] == ["instruction", "code"]  # instruction first


def test_ast_similarity_and_execution_validation(tmp_path):
    import asyncio

    from megaphi.synth.client import ChatClient
    from megaphi.synth.workflow import WorkflowSpec, run_workflow
    from megaphi.synth.workflows import ast_similarity

    assert ast_similarity('def f(a):\n    """doc"""\n    return a + 1',
                          "def g(x):\n    return x + 1") == 1.0
    assert ast_similarity("def f(a):\n    return a + 1", "def f(a):\n    return a * 2") < 1
    assert ast_similarity("def f(a):", "x = 1") == 0.0  # does not parse
    records = [{"id": "ok", "code": "def f():\n    return 1", "tests": "assert f() == 1",
                "source": "kept as is"},
               {"id": "bad", "code": "def f():\n    return 2", "tests": "assert f() == 1"}]
    spec = WorkflowSpec.load(str(SYNTH / "execution_validation.yaml"))
    client = ChatClient("http://127.0.0.1:9/v1", "none", api_key_env=None)  # never called
    inputs = [{**r, "_where": f"in:{k}"} for k, r in enumerate(records)]
    summary = asyncio.run(run_workflow(spec, inputs, client, str(tmp_path / "v.jsonl"),
                                       progress=False))
    (kept,) = lines(tmp_path / "v.jsonl")
    assert kept["id"] == "ok" and kept["source"] == "kept as is"
    assert kept["validation"]["passed"] and summary["requests"] == 0


def test_shards_split_the_input_and_mark_completion(server, tmp_path):
    """Shard 0 of 2 by flag, shard 1 of 2 from the SLURM array variables: every other line
    each, one output and one .done marker per shard."""
    write(tmp_path / "q.jsonl", [{"id": f"q{i}", "question": f"PROBLEM good {i}"}
                                 for i in range(5)])
    first = synth(server, "plurality_vote.yaml", tmp_path / "q.jsonl", tmp_path / "o.jsonl",
                  "--shard-index", "0", "--num-shards", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    cmd = [sys.executable, "-m", "megaphi.synth.cli", "run", str(SYNTH / "plurality_vote.yaml"),
           "--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "o.jsonl"),
           "--endpoint", server.url, "--model", MODEL, "--no-progress"]
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env=worker_env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2"))
    assert second.returncode == 0, second.stderr[-3000:]
    shards = [tmp_path / f"o.shard-{i}-of-2.jsonl" for i in range(2)]
    assert [sorted(r["id"] for r in lines(s)) for s in shards] == [["q0", "q2", "q4"],
                                                                  ["q1", "q3"]]
    assert all(s.with_name(s.name + ".done").exists() for s in shards)
    assert not (tmp_path / "o.jsonl").exists()


def test_every_shipped_workflow_loads():
    from megaphi.synth.workflow import WorkflowSpec
    from megaphi.synth.workflows import KINDS

    specs = [WorkflowSpec.load(str(p)) for p in sorted(SYNTH.glob("*.yaml"))]
    assert {s.kind for s in specs} == set(KINDS)  # every kind has an example
    for spec in specs:
        assert set(spec.templates) == set(KINDS[spec.kind].steps), spec.path
        assert all(t.fields for t in spec.templates.values()), spec.path
