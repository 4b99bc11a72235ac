"""Pivotal Token Search: the Figure 4 bisection on planted pivots, its split point and cost."""

import math
from collections import Counter

import numpy as np
import pytest

from megaphi.pts import pivotal_tokens, split_point


def planted(n: int, jumps: dict, base: float = 0.1):
    """A p(success | prefix) that depends only on the prefix length: ``base`` plus each jump
    ``{position: delta}`` once the token at ``position`` is in the prefix (near-monotone, as
    the report assumes); records every call."""
    calls = Counter()

    def p_success(prefix):
        calls[tuple(prefix)] += 1
        k = len(prefix)
        return base + sum(d for pos, d in jumps.items() if pos < k)

    return p_success, calls


@pytest.mark.parametrize("jumps", [{137: 0.3, 400: 0.35}, {3: 0.25, 500: 0.3},
                                   {0: 0.5}, {511: 0.4}, {200: 0.25, 201: 0.3}])
def test_planted_pivots_are_found_with_their_probabilities(jumps):
    n = 512
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100_000, n).tolist()
    logprobs = (-rng.exponential(1.0, n)).tolist()
    p_success, calls = planted(n, jumps)
    pivots = pivotal_tokens(ids, logprobs, p_success, p_gap=0.2)
    assert [p.index for p in pivots] == sorted(jumps)
    level = 0.1
    for pivot in pivots:
        assert pivot.p_before == pytest.approx(level)
        level += jumps[pivot.index]
        assert pivot.p_after == pytest.approx(level) and pivot.delta == pytest.approx(
            jumps[pivot.index])
    assert max(calls.values()) == 1  # each prefix estimated once
    assert all(list(prefix) == ids[:len(prefix)] for prefix in calls)  # ids, never re-tokenised
    # about 2 + 2 k log2(n) estimates, not a scan of n + 1
    assert len(calls) <= 2 + 2 * len(jumps) * math.log2(n) * 1.6, len(calls)


def test_estimates_grow_like_k_log_n():
    rng = np.random.default_rng(1)
    counts = {}
    for n in (64, 512, 4096):
        p_success, calls = planted(n, {n // 3: 0.3, 2 * n // 3: 0.3})
        pivotal_tokens(list(range(n)), (-rng.exponential(1.0, n)).tolist(), p_success)
        counts[n] = len(calls)
    assert counts[512] < 60 and counts[4096] < 80, counts  # against 513 and 4097 for a scan
    assert counts[4096] - counts[512] < 2 * (counts[512] - counts[64]) + 10, counts


def test_no_pivot_below_the_gap_and_flat_segments_are_not_searched():
    p_success, calls = planted(100, {50: 0.15})
    assert pivotal_tokens(list(range(100)), [-1.0] * 100, p_success, p_gap=0.2) == []
    assert len(calls) == 2  # p(empty) and p(whole): close, so nothing is split


def test_the_first_split_is_the_log_probability_midpoint():
    """log-probs -1..-5: cumulative 0, -1, -3, -6, -10, -15; half the total is -7.5, nearest
    is -6 after 3 tokens (the token midpoint would be after 2)."""
    logprobs = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert split_point(logprobs, 0, 5) == 3
    p_success, calls = planted(5, {4: 0.5})
    order = []
    pivotal_tokens([10, 11, 12, 13, 14], logprobs,
                   lambda prefix: (order.append(len(prefix)), p_success(prefix))[1])
    assert order[:3] == [0, 5, 3]
    # certain tokens (log-prob 0) carry no information: the token midpoint
    assert split_point([0.0] * 6, 0, 6) == 3
    # the closed form on a random segment
    rng = np.random.default_rng(2)
    lp = (-rng.exponential(2.0, 40)).tolist()
    cum = np.concatenate([[0.0], np.cumsum(lp[5:30])])
    expected = 5 + 1 + int(np.argmin(np.abs(cum[1:-1] - cum[-1] / 2)))
    assert split_point(lp, 5, 30) == expected


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2 token ids but 1 log-probs"):
        pivotal_tokens([1, 2], [-1.0], lambda p: 0.5)
    with pytest.raises(ValueError, match="p_gap"):
        pivotal_tokens([1], [-1.0], lambda p: 0.5, p_gap=0.0)


# ---------------------------------------------------------------------------------------------
# Rollout estimates and the token pair of a pivot (a scripted stand-in for the policy backend)


class DecidedAt:
    """A stand-in policy over ids 0..9 for completions of ``length`` tokens: the token at
    ``position`` is 3 with probability ``p`` (success), another id otherwise; every other
    token is uniform. Success depends only on that token: p(prefix) is ``p`` before it, 1 or
    0 after it."""

    def __init__(self, length=12, position=5, p=0.5):
        self.length, self.position, self.p, self.calls = length, position, p, []

    def sample(self, prompt_ids, n, seed):
        import random

        self.calls.append((list(prompt_ids), n, seed))
        rng = random.Random(seed)
        done = len(prompt_ids) - 2  # the prompt is 2 query ids + the prefix
        out = []
        for _ in range(n):
            c = []
            for k in range(done, self.length):
                if k == self.position:
                    c.append(3 if rng.random() < self.p else rng.choice([0, 1, 2, 4, 5]))
                else:
                    c.append(rng.randrange(10))
            out.append((c, [-1.0] * len(c)))
        return out

    def check(self, completion):
        return len(completion) > self.position and completion[self.position] == 3


def test_estimator_finds_the_deciding_token_and_its_pair():
    from megaphi.pts.estimate import SuccessEstimator, confirm, token_pair

    policy = DecidedAt()
    est = SuccessEstimator(policy, policy.check, query_ids=[100, 101], rollouts=40, seed=7)
    solution = [1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 0, 1]  # token 3 at position 5: a success
    logprobs = [-2.3] * 12
    logprobs[5] = -0.7
    pivots = pivotal_tokens(solution, logprobs, est, p_gap=0.2)
    assert [p.index for p in pivots] == [5]
    assert pivots[0].p_after == 1.0 and 0.3 < pivots[0].p_before < 0.7
    assert est.rollouts_used == 40 * est.estimates and est.estimates < 13
    assert len({tuple(c[0]) for c in policy.calls}) == len(policy.calls)  # one draw a prefix
    pair = token_pair(est, solution[:5], solution[5], pivots[0].delta)
    assert pair is not None and pair[0] == 3 and pair[1] in (0, 1, 2, 4, 5)
    before = est.rollouts_used
    holds, p_acc, p_rej = confirm(est, solution[:5], pair, p_gap=0.2)
    assert holds and (p_acc, p_rej) == (1.0, 0.0)
    assert est.rollouts_used == before + 80  # fresh rollouts, not the memoised ones
    # the same seed draws the same rollouts; another seed others
    again = SuccessEstimator(policy, policy.check, [100, 101], rollouts=40, seed=7)
    assert again(solution[:5]) == est(solution[:5])
    other = SuccessEstimator(policy, policy.check, [100, 101], rollouts=40, seed=8)
    assert other.draw(solution[:5]) != est.draw(solution[:5])


def test_a_token_that_lowers_success_is_the_rejected_one():
    from megaphi.pts.estimate import SuccessEstimator, token_pair

    policy = DecidedAt(p=0.6)
    est = SuccessEstimator(policy, policy.check, [100, 101], rollouts=40, seed=3)
    failed = [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 0, 1]  # position 5 is not 3: a failure
    pivots = pivotal_tokens(failed, [-1.0] * 12, est)
    assert [p.index for p in pivots] == [5] and pivots[0].delta < 0
    assert token_pair(est, failed[:5], 0, pivots[0].delta) == (3, 0)


# ---------------------------------------------------------------------------------------------
# The run over a questions file: filter, pairs in the DPO format, resumable output


def write_questions(path, n):
    import json

    lines = [json.dumps({"id": f"q{i}", "question": f"Question {i}?", "type": "math",
                         "answer": "3"}) for i in range(n)]
    lines.insert(1, json.dumps({"id": "easy", "messages": [{"role": "user", "content": "Hi"}],
                                "type": "math", "answer": "3"}))
    path.write_text("\n".join(lines) + "\n")


def run_pts(tmp_path, out, stop_after=None, rank=0, world_size=1):
    from megaphi.data.tokenizer import Phi4Tokenizer
    from megaphi.pts.run import SearchSettings, load_questions, run

    tok = Phi4Tokenizer()
    questions = load_questions(str(tmp_path / "q.jsonl"))
    calls = []

    class Policy(DecidedAt):
        def sample(self, prompt_ids, n, seed):
            calls.append(1)
            if stop_after is not None and len(calls) > stop_after:
                raise KeyboardInterrupt  # a kill in the middle of a question
            sep = tok.encode("<|im_sep|>")[0]  # the prefix follows the assistant header
            prefix = prompt_ids[len(prompt_ids) - prompt_ids[::-1].index(sep):]
            return super().sample([0, 0] + prefix, n, seed)

    def is_correct(question, text):
        return question["id"] == "easy" or (len(text) > 5 and text[5] == tok.decode([3]))

    return run(questions, tok, Policy(), is_correct, SearchSettings(rollouts=40, seed=1),
               str(out), progress=False, rank=rank, world_size=world_size)


def test_pts_run_writes_confirmed_token_pairs_and_resumes_without_duplicates(tmp_path):
    import json

    write_questions(tmp_path / "q.jsonl", 3)
    straight = tmp_path / "straight.jsonl"
    summary = run_pts(tmp_path, straight)
    assert summary["questions"] == 4 and summary["kept"] == 3  # "easy": p = 1, not searched
    pairs = [json.loads(x) for x in straight.read_text().splitlines()]
    assert pairs and all(p["position"] == 5 and p["chosen_token_id"] == 3 for p in pairs)
    for p in pairs:
        assert set(p) >= {"prompt", "prefix_ids", "chosen_token_id", "rejected_token_id",
                          "question_id", "p_before", "p_after", "rollouts", "p_chosen"}
        assert len(p["prefix_ids"]) == 5 and p["p_chosen"] - p["p_rejected"] >= 0.2
    # killed during the last question, then rerun: the same pairs, once each
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_pts(tmp_path, out, stop_after=summary["rollouts"] // 40 - 2)
    assert len((tmp_path / "resumed.jsonl.progress.jsonl").read_text().splitlines()) == 3
    with open(out, "a") as f:  # a question's pairs written, its done mark not: dropped
        f.write(json.dumps({**pairs[0], "question_id": "q2"}) + "\n")
    with open(str(out) + ".progress.jsonl", "a") as f:  # its done mark torn by the kill
        f.write('{"id": "q2", "kept"')
    assert run_pts(tmp_path, out) == summary
    assert out.read_text() == straight.read_text()
    assert run_pts(tmp_path, out, stop_after=0) == summary  # all done: nothing sampled


def test_data_parallel_processes_share_one_resumable_output(tmp_path):
    """Two processes (rank 0 and 1 of 2) over one questions file write the pairs of the
    single-process run (as a set: the order follows completion), the summary comes from the
    one that finished the file; rank 1 killed mid-question and relaunched loses nothing and
    duplicates nothing, and leaves rank 0's lines alone."""
    import json

    write_questions(tmp_path / "q.jsonl", 5)
    straight = tmp_path / "straight.jsonl"
    summary = run_pts(tmp_path, straight)
    out = tmp_path / "dp.jsonl"
    assert run_pts(tmp_path, out, rank=0, world_size=2) is None  # rank 1 has not run yet
    with pytest.raises(KeyboardInterrupt):
        run_pts(tmp_path, out, stop_after=5, rank=1, world_size=2)
    done = [json.loads(x)["id"] for x in
            (tmp_path / "dp.jsonl.progress.jsonl").read_text().splitlines()]
    # the file: q0 easy q1 q2 q3 q4; rank 0 did q0 q1 q3, rank 1 easy before it was killed
    assert set(done) == {"q0", "q1", "q3", "easy"}
    pairs = [json.loads(x) for x in straight.read_text().splitlines()]
    with open(out, "a") as f:  # rank 1's question q2 half written when it was killed
        f.write(json.dumps({**pairs[0], "question_id": "q2"}) + "\n" + '{"id": "q2/')
    assert run_pts(tmp_path, out, rank=1, world_size=2) == summary
    assert sorted(out.read_text().splitlines()) == sorted(straight.read_text().splitlines())
    assert run_pts(tmp_path, out, rank=0, world_size=2) == summary  # all done: rank 0 reports
    assert run_pts(tmp_path, out, rank=1, world_size=2) is None


def test_a_finished_completion_is_checked_not_continued():
    """A prefix that ends with a stop id is a whole completion: its p(success) is the
    oracle's verdict on it, with no rollouts."""
    from megaphi.pts.estimate import SuccessEstimator

    policy = DecidedAt()
    est = SuccessEstimator(policy, policy.check, [100, 101], rollouts=40, seed=7,
                           stop_ids=(99,))
    assert est([1, 2, 3, 4, 5, 3, 99]) == 1.0 and est([1, 2, 3, 4, 5, 0, 99]) == 0.0
    assert est.rollouts_used == 0 and policy.calls == []
    assert 0.0 < est([1, 99, 7]) < 1.0  # a stop id inside the prefix: sampled
    assert est.rollouts_used == 40


def test_bad_question_lines_name_file_and_line(tmp_path):
    from megaphi.pts.run import QuestionError, load_questions

    for line, message in (('{"id": 1, "question": "x", "type": "poem", "answer": "1"}',
                           "type"), ('{"id": 1, "question": "x", "type": "math"}', '"answer"'),
                          ('{"id": 1, "type": "code", "tests": "assert 1"}', '"messages"'),
                          ('not json', "not JSON")):
        path = tmp_path / "q.jsonl"
        path.write_text('{"id": 0, "question": "ok", "type": "choice", "answer": "A"}\n' + line)
        with pytest.raises(QuestionError, match=f"q.jsonl:2: .*{message}"):
            load_questions(str(path))


def test_arithmetic_task_solutions_are_correct(tmp_path):
    """tools/build_arithmetic_task.py: every worked solution's boxed answer is the sum, and the
    questions are in the PTS format."""
    import importlib.util
    import json
    import re
    from pathlib import Path

    from megaphi.pts.run import load_questions

    path = Path(__file__).resolve().parents[1] / "tools" / "build_arithmetic_task.py"
    spec = importlib.util.spec_from_file_location("build_arithmetic_task", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.worked_solution(47, 38) == ("7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8, "
                                            "write 8. The answer is \\boxed{85}.")
    assert tool.main(["--questions", str(tmp_path / "q.jsonl"), "--sft",
                      str(tmp_path / "s.jsonl"), "--count", "50", "--digits", "3"]) == 0
    for line in (tmp_path / "s.jsonl").read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        a, b = map(int, re.findall(r"\d+", user["content"]))
        assert assistant["content"].endswith(f"\\boxed{{{a + b}}}.")
    questions = load_questions(str(tmp_path / "q.jsonl"))
    assert len(questions) == 50 and all(q["type"] == "math" for q in questions)
