"""Pivotal Token Search over a file of questions: filter by success rate, search one sampled
solution per question, turn each pivot into a DPO token pair, write them resumably.

A question is one JSON line ``{"id", "messages" or "question", "type", "answer" or "tests"}``:
``type`` picks the oracle (``math``, ``choice``: ``answer``; ``code``: ``tests``), ``messages``
is a chat prompt ending with a user turn (``question`` is shorthand for one user message).

Per question (all in token ids: the prompt is rendered once, prefixes are never re-tokenised):

1. ``rollouts`` completions of the prompt estimate p(success); a question outside
   ``[p_min, p_max]`` is not searched (too easy or too hard to have pivots);
2. the first of those completions is the solution searched (:func:`pivotal_tokens`, with its
   token log-probs under the policy);
3. each pivot's accepted and rejected tokens come from the rollouts already drawn at its
   prefix (:func:`~megaphi.pts.estimate.token_pair`), confirmed with fresh rollouts unless
   ``confirm`` is off;
4. each pair is a token pair of the DPO data format plus metadata.

Output: ``OUT`` gets a question's pairs in one append, then ``OUT.progress.jsonl`` a line
saying the question is done (with its statistics). A rerun skips done questions and first
removes from ``OUT`` any line of a question that was not marked done (a run killed between the
two writes): no duplicates, no losses. Seeds derive from the run's seed, the question and the
prefix, so a rerun draws the same rollouts, whatever the number of processes.

Data parallel (torchrun): each process loads its own policy and searches every
``world_size``-th question; all append to the same ``OUT`` under a file lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

from megaphi.data.jsonl import ResumableOutput
from megaphi.pts.estimate import (DEFAULT_P_GAP, DEFAULT_ROLLOUTS, SuccessEstimator, confirm,
                                  prefix_seed, token_pair)
from megaphi.pts.search import pivotal_tokens

logger = logging.getLogger("megaphi.pts")

TYPES = {"math": "answer", "choice": "answer", "code": "tests"}


class QuestionError(ValueError):
    """A bad line of the questions file (the message names the file and line)."""


@dataclass(frozen=True)
class SearchSettings:
    rollouts: int = DEFAULT_ROLLOUTS
    p_gap: float = DEFAULT_P_GAP
    p_min: float = 0.2
    p_max: float = 0.8
    confirm: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.rollouts < 1:
            raise ValueError(f"--rollouts must be >= 1, got {self.rollouts}")
        if not 0.0 < self.p_gap <= 1.0:
            raise ValueError(f"--p-gap must be in (0, 1], got {self.p_gap}")
        if not 0.0 <= self.p_min <= self.p_max <= 1.0:
            raise ValueError(f"need 0 <= --p-min <= --p-max <= 1, got {self.p_min}, "
                             f"{self.p_max}")


def load_questions(path: str) -> List[dict]:
    """The questions of a JSONL file, each checked; :class:`QuestionError` names file:line."""
    from megaphi.data.chat import ChatFormatError, parse_messages
    from megaphi.data.jsonl import json_lines

    out, seen = [], {}
    for where, q in json_lines(path, QuestionError):
        if not isinstance(q, dict) or "id" not in q:
            raise QuestionError(f"{where}: a question needs an \"id\"")
        qid = str(q["id"])
        if qid in seen:
            raise QuestionError(f"{where}: id {qid!r} repeats {seen[qid]}")
        seen[qid] = where
        kind = q.get("type")
        if kind not in TYPES:
            raise QuestionError(f"{where}: \"type\" must be one of {', '.join(TYPES)}, got "
                                f"{kind!r}")
        if TYPES[kind] not in q:
            raise QuestionError(f"{where}: a {kind} question needs \"{TYPES[kind]}\"")
        if "messages" in q:
            try:
                messages = parse_messages(q, "messages", '"messages"', "")
            except ChatFormatError as exc:
                raise QuestionError(f"{where}: {exc}") from None
        elif isinstance(q.get("question"), str):
            messages = [{"role": "user", "content": q["question"]}]
        else:
            raise QuestionError(f"{where}: a question needs \"messages\" (chat messages) "
                                "or \"question\" (text)")
        if messages[-1]["role"] != "user":
            raise QuestionError(f"{where}: the messages must end with a user turn")
        out.append({**q, "id": qid, "messages": messages})
    return out


@dataclass
class QuestionResult:
    id: str
    p_success: float
    kept: bool
    pivots: int = 0
    pairs: List[dict] = field(default_factory=list)
    unconfirmed: int = 0
    rollouts: int = 0

    def stats(self) -> dict:
        return {"id": self.id, "p_success": self.p_success, "kept": self.kept,
                "pivots": self.pivots, "pairs": len(self.pairs),
                "unconfirmed": self.unconfirmed, "rollouts": self.rollouts}


def search_question(question: dict, tokenizer, backend, is_correct: Callable[[dict, str], bool],
                    settings: SearchSettings) -> QuestionResult:
    """Pivotal Token Search on one question (steps 1-4 of the module docstring)."""
    from megaphi.data.chat import render_chat

    prompt_ids, _ = render_chat(question["messages"], tokenizer, add_generation_prompt=True)
    stops = stop_ids(tokenizer)

    def check(completion_ids: List[int]) -> bool:
        ids = list(completion_ids)
        while ids and ids[-1] in stops:
            ids.pop()
        return bool(is_correct(question, tokenizer.decode(ids)))

    seed = prefix_seed(settings.seed, [], salt=question["id"])
    estimator = SuccessEstimator(backend, check, prompt_ids, settings.rollouts, seed, stops)
    p0 = estimator([])
    result = QuestionResult(question["id"], p0, settings.p_min <= p0 <= settings.p_max)
    if result.kept:
        solution = estimator.draw([])[0]
        pivots = pivotal_tokens(solution.token_ids, solution.logprobs, estimator, settings.p_gap)
        result.pivots = len(pivots)
        for pivot in pivots:
            prefix = list(solution.token_ids[:pivot.index])
            pair = token_pair(estimator, prefix, solution.token_ids[pivot.index], pivot.delta)
            if pair is None:
                result.unconfirmed += 1
                continue
            record = {"id": f"{question['id']}/{pivot.index}", "question_id": question["id"],
                      "type": question["type"], "prompt": question["messages"],
                      "prefix_ids": prefix, "chosen_token_id": pair[0],
                      "rejected_token_id": pair[1], "position": pivot.index,
                      "p_before": pivot.p_before, "p_after": pivot.p_after}
            if settings.confirm:
                holds, p_acc, p_rej = confirm(estimator, prefix, pair, settings.p_gap)
                record.update(p_chosen=p_acc, p_rejected=p_rej)
                if not holds:
                    result.unconfirmed += 1
                    continue
            result.pairs.append(record)
    result.rollouts = estimator.rollouts_used
    for record in result.pairs:
        record["rollouts"] = result.rollouts
    return result


def stop_ids(tokenizer) -> List[int]:
    """Where a rollout ends: ``<|im_end|>`` (the assistant's turn) and end-of-document."""
    from megaphi.data.chat import chat_token_ids

    return sorted({chat_token_ids(tokenizer).im_end, tokenizer.eod_id})


def summary(stats: Iterable[dict]) -> dict:
    """Questions kept by the filter, pivots per question, rollouts per pivot."""
    stats = list(stats)
    kept = [s for s in stats if s["kept"]]
    pivots = sum(s["pivots"] for s in kept)
    rollouts = sum(s["rollouts"] for s in stats)
    return {"questions": len(stats), "kept": len(kept), "pivots": pivots,
            "pairs": sum(s["pairs"] for s in kept),
            "unconfirmed": sum(s["unconfirmed"] for s in kept),
            "pivots_per_kept_question": pivots / len(kept) if kept else 0.0,
            "rollouts": rollouts, "rollouts_per_pivot": rollouts / pivots if pivots else None}


def run(questions: List[dict], tokenizer, backend, is_correct, settings: SearchSettings,
        output: str, progress: bool = True, rank: int = 0,
        world_size: int = 1) -> Optional[dict]:
    """Search every question not yet done in ``output``.

    With ``world_size`` data-parallel processes (torchrun), process ``rank`` searches questions
    ``rank, rank + world_size, ...`` of the file and all append to the same ``output``.

    Returns :func:`summary` of the whole file in the process that finished its last question
    (or in rank 0 when nothing was left to do), None in the others.
    """
    import time

    from tqdm import tqdm

    index = {q["id"]: i for i, q in enumerate(questions)}
    mine = [q for i, q in enumerate(questions) if i % world_size == rank]
    out = ResumableOutput(output, "question_id",
                          owns=lambda qid: index.get(qid, -1) % world_size == rank)
    todo = [q for q in mine if q["id"] not in out.done]
    done = out.done
    start, rollouts, pivots = time.perf_counter(), 0, 0
    desc = "questions" if world_size == 1 else f"questions (rank {rank} of {world_size})"
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="q",
              disable=not progress, dynamic_ncols=True) as bar:
        for q in todo:
            result = search_question(q, tokenizer, backend, is_correct, settings)
            done = out.write(result.id, result.pairs, result.stats())
            rollouts += result.rollouts
            pivots += result.pivots
            bar.update(1)
            bar.set_postfix_str(f"{pivots} pivots, {rollouts / (time.perf_counter() - start):.1f}"
                                " rollouts/s", refresh=False)
    finished = all(q["id"] in done for q in questions)
    if finished and (todo or rank == 0):
        return summary(done[q["id"]] for q in questions)
    logger.info("rank %d: %d of its %d questions searched in this run (%d pivots, %d rollouts)",
                rank, len(todo), len(mine), pivots, rollouts)
    return None


__all__ = ["QuestionError", "QuestionResult", "SearchSettings",
           "load_questions", "run", "search_question", "stop_ids", "summary"]
