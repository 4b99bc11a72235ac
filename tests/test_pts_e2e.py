"""Pivotal Token Search end to end on CPU, as a user runs it: the shipped toy task
(tools/build_arithmetic_task.py: one-digit addition, a character-level tokenizer), a tiny
policy pre-trained and fine-tuned on it until it succeeds about half the time, PTS over its
solutions on two data-parallel processes, the pairs re-estimated with fresh rollouts, then
preprocessed as token pairs and trained with the DPO phase."""

import json
import math
import subprocess
import sys

import pytest

from distributed import ROOT, eval_json, logged_losses, megaphi_train, torchrun, worker_env

QUESTIONS = 8
ROLLOUTS = 16
COMMON = ["model.vocab_size=128", "model.seq_length=128", "train.micro_batch_size=8",
          "train.global_batch_size=8", "data.num_workers=0", "logging.tensorboard=false",
          "checkpoint.keep_last=1"]


def run_tool(*args, nproc=0, timeout=600):
    """A tool of tools/ as a subprocess (under torchrun with ``nproc`` processes)."""
    script = ROOT / "tools" / args[0]
    cmd = torchrun(nproc, script, *args[1:]) if nproc else [sys.executable, str(script),
                                                             *map(str, args[1:])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The toy task's files and a policy: 40 pre-training steps on the solutions as text, then
    100 SFT steps on the conversations."""
    tmp = tmp_path_factory.mktemp("pts_task")
    run_tool("build_arithmetic_task.py", "--digits", "1", "--max-operand", "4", "--style",
             "direct", "--count", "2000", "--sft", tmp / "sft.jsonl", "--text",
             tmp / "text.jsonl", "--questions", tmp / "q_all.jsonl", "--tokenizer", tmp / "tok")
    lines = (tmp / "q_all.jsonl").read_text().splitlines(True)
    (tmp / "q.jsonl").write_text("".join(lines[:QUESTIONS]))
    for name, fmt in (("text", "text"), ("sft", "chat")):
        run_tool("preprocess_data.py", "--input", tmp / f"{name}.jsonl", "--output-prefix",
                 tmp / name, "--format", fmt, "--tokenizer", tmp / "tok", "--no-progress")
        (tmp / f"{name}.yaml").write_text(f"train:\n  add: {{weight: 1.0, prefixes: "
                                          f"[{tmp / name}]}}\n")
    tok = [f"data.tokenizer={tmp / 'tok'}"]
    pre = megaphi_train(1, *COMMON, *tok, f"data.mixture={tmp / 'text.yaml'}",
                        f"train.run_dir={tmp / 'pre'}", "train.iters=40", "optimizer.lr=3e-3",
                        "schedule.warmup_iters=5", "train.log_interval=10")
    assert pre.returncode == 0, pre.stderr[-4000:]
    sft = megaphi_train(1, *COMMON, *tok, "phase.name=sft", f"checkpoint.load={tmp / 'pre'}",
                        f"data.mixture={tmp / 'sft.yaml'}", f"train.run_dir={tmp / 'sft'}",
                        "train.iters=100", "optimizer.lr=4e-3", "schedule.warmup_iters=5",
                        "train.log_interval=20")
    assert sft.returncode == 0, sft.stderr[-4000:]
    return tmp


@pytest.fixture(scope="module")
def searched(task):
    """tools/pivotal_token_search.py with the SFT model as the policy, 2 processes."""
    proc = run_tool("pivotal_token_search.py", "--questions", task / "q.jsonl", "--policy",
                    task / "sft", "--output", task / "pairs.jsonl", "--rollouts", ROLLOUTS,
                    "--max-new-tokens", 24, "--no-progress", nproc=2)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    pairs = [json.loads(x) for x in (task / "pairs.jsonl").read_text().splitlines()]
    return summary, pairs


def test_pts_finds_pivots_in_the_policys_solutions(task, searched):
    """The policy succeeds about half the time, so most questions pass the [0.2, 0.8] filter,
    and the search finds the token that decides each answer: the answer digit, right after
    ``\\boxed{``, where p(success) jumps from about one half to 0 or 1."""
    from megaphi.data.tokenizer import load_tokenizer

    summary, pairs = searched
    stats = [json.loads(x) for x in
             (task / "pairs.jsonl.progress.jsonl").read_text().splitlines()]
    assert len(stats) == summary["questions"] == QUESTIONS  # each once, from either process
    p0 = [s["p_success"] for s in stats]
    assert 0.2 < sum(p0) / len(p0) < 0.8, p0
    assert summary["kept"] >= QUESTIONS // 2 and summary["pivots"] >= summary["kept"] // 2
    assert len(pairs) == summary["pairs"] >= 3
    tok = load_tokenizer(str(task / "tok"))
    for pair in pairs:
        text = tok.decode(pair["prefix_ids"])
        assert text.endswith("\\boxed{"), text  # the answer's first digit decides
        assert pair["chosen_token_id"] != pair["rejected_token_id"]
        assert abs(pair["p_after"] - pair["p_before"]) >= 0.2
        assert pair["p_chosen"] - pair["p_rejected"] >= 0.2 and pair["rollouts"] > ROLLOUTS
        a, b = map(int, pair["prompt"][-1]["content"][len("What is "):-1].split(" + "))
        # the accepted digit begins the right answer; the rejected one does not
        assert str(a + b).startswith(tok.decode([pair["chosen_token_id"]]))
        assert not str(a + b).startswith(tok.decode([pair["rejected_token_id"]]))


def test_pairs_hold_with_fresh_rollouts(task, searched):
    """Re-estimated in this process with rollouts of another seed (twice as many), the
    accepted token's p(success) still beats the rejected one's by p_gap for every pair."""
    from megaphi.data.chat import render_chat
    from megaphi.inference import InferenceModel
    from megaphi.oracles import check
    from megaphi.pts.backends import MegaphiBackend, Sampling
    from megaphi.pts.estimate import SuccessEstimator
    from megaphi.pts.run import load_questions, stop_ids

    _, pairs = searched
    questions = {q["id"]: q for q in load_questions(str(task / "q.jsonl"))}
    with InferenceModel.from_checkpoint(task / "sft", device="cpu") as model:
        tok = model.tokenizer
        stops = stop_ids(tok)
        backend = MegaphiBackend(model, Sampling(1.0, 1.0, 24, tuple(stops)))
        for pair in pairs:
            question = questions[pair["question_id"]]
            prompt, _ = render_chat(question["messages"], tok, add_generation_prompt=True)

            def correct(ids, question=question):
                return check(question, tok.decode([t for t in ids if t not in stops])).correct

            est = SuccessEstimator(backend, correct, prompt, rollouts=2 * ROLLOUTS, seed=99,
                                   stop_ids=stops)
            chosen = est(pair["prefix_ids"] + [pair["chosen_token_id"]])
            rejected = est(pair["prefix_ids"] + [pair["rejected_token_id"]])
            assert chosen - rejected >= 0.2, (pair["id"], chosen, rejected)


def test_pts_pairs_train_with_the_dpo_phase(task, searched):
    """The pairs preprocess as token pairs and train with the DPO phase from the SFT
    checkpoint (its own reference): step 1 logs ln 2 with every pair a tie, and the loss
    falls; evaluated afterwards over all the pairs (megaphi-eval against the SFT reference),
    at least two thirds are won (none was at step 1) and the loss is well below ln 2."""
    _, pairs = searched
    run_tool("preprocess_data.py", "--format", "preference", "--input", task / "pairs.jsonl",
             "--output-prefix", task / "pairs", "--tokenizer", task / "tok", "--no-progress")
    meta = json.loads((task / "pairs.meta.json").read_text())
    assert meta["kind"] == "preference" and meta["token_pairs"] == meta["pairs"] == len(pairs)
    (task / "pairs.yaml").write_text(f"train:\n  pts: {{weight: 1.0, prefixes: "
                                     f"[{task / 'pairs'}]}}\n")
    run_dir = task / "dpo"
    proc = megaphi_train(1, *COMMON, f"data.tokenizer={task / 'tok'}", "phase.name=dpo",
                         f"checkpoint.load={task / 'sft'}", f"data.mixture={task / 'pairs.yaml'}",
                         f"train.run_dir={run_dir}", "train.iters=16", "train.log_interval=1",
                         "train.global_batch_size=2", "train.micro_batch_size=1",
                         "optimizer.lr=3e-3", "optimizer.min_lr=3e-3", "schedule.warmup_iters=0",
                         "optimizer.weight_decay=0.0", "dpo.beta=0.5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert sum(r["pairs"] for r in steps[:2]) >= len(pairs)  # an epoch in two steps or less
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[0]["rewards/accuracy"] == 0.0
    losses = logged_losses(run_dir)
    assert losses[-1] < losses[0] - 0.1, losses
    after = eval_json(1, run_dir, task / "pairs", "--reference", task / "sft", "--beta", "0.5")
    assert after["pairs"] == len(pairs) and after["dropped"] == 0
    assert after["accuracy"] >= 0.66 and after["loss"] < math.log(2) - 0.2
    assert after["margin"] > 0
