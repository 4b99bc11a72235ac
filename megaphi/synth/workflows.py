"""The logic of each workflow kind (the ``kind`` of a workflow YAML file).

Each kind names its request ``steps`` (one template each), its ``settings`` with defaults, and
``run(ctx, record)``, which makes its requests through ``ctx.ask`` and returns the records the
item produces (none when the item is filtered out).

- ``plurality_vote`` (question curation, report §2): ``samples`` answers per question; the
  final answer of each (the last ``\\boxed{...}``, else the text after the last "answer is" or
  "Answer:") normalised (spaces, a trailing period, ``$``, case and a leading ``x =`` removed)
  and counted as a string.
  A question whose answers all agree is too easy and one whose most common answer has no more
  than ``min_agreement`` of the votes is too hard: both are dropped. The others keep the
  majority answer as pseudo ground truth, written as a Pivotal Token Search question
  (``{"id", "question", "type": "math", "answer", "votes", "agreement"}``).
- ``judge_pairs`` (DPO round 2, report §4.3): ``responses`` answers per prompt from the
  policy, each scored by the judge with the rubric of the ``judge`` template, which must end
  with a line ``Score: N`` (0 to ``score_max``); the best and the worst answers make a pair when
  their scores differ by at least ``min_gap``. Written as a DPO pair
  (``{"prompt": [messages], "chosen", "rejected", "scores", "gap"}``). An answer the judge does
  not score is left out of the pair (counted in ``unscored``).
- ``rewrite`` (rewrite and augment, report §2): a seed passage becomes an exercise (the
  ``exercise`` template), which the model then solves (``solution``, given ``{exercise}``);
  written as an SFT conversation (``{"messages": [user: exercise, assistant: solution]}``).
  An empty exercise or solution drops the item.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, List, Optional

from megaphi.synth.client import SynthError


class Kind:
    steps: tuple = ()
    defaults: Dict[str, Any] = {}
    given: Dict[str, set] = {}
    """Per step, the template fields the workflow fills in itself (the rest come from input)."""

    def __init__(self, settings: Dict[str, Any]):
        self.settings = settings

    def check_input(self, record: dict, spec) -> None:
        for step in self.steps:
            missing = spec.templates[step].fields - set(record) - self.given.get(step, set())
            if missing:
                raise SynthError(f"{record['_where']}: template {spec.templates[step].name} "
                                 f"needs {{{sorted(missing)[0]}}}, which the line does not "
                                 "have; add the field or change the template")


_BOXED = re.compile(r"\\boxed\{")
_ANSWER = re.compile(r"(?:answer is|answer:)\s*(.+)", re.IGNORECASE)


def final_answer(text: str) -> Optional[str]:
    """The final answer of a solution, normalised; None when it states none."""
    found = None
    for match in _BOXED.finditer(text):
        depth, k = 1, match.end()
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        if depth == 0:
            found = text[match.end():k - 1]
    if found is None:
        matches = _ANSWER.findall(text)
        found = matches[-1].splitlines()[0] if matches else None
    if found is None:
        return None
    answer = re.sub(r"\s+", "", found).strip("$").rstrip(".").lower()
    assigned = re.fullmatch(r"[a-z]\w*=(.+)", answer)  # "x = 9" answers 9
    return (assigned.group(1) if assigned else answer) or None


class PluralityVote(Kind):
    steps = ("answer",)
    defaults = {"samples": 8, "min_agreement": 0.5}

    async def run(self, ctx, record: dict) -> List[dict]:
        n = int(self.settings["samples"])
        reply = await ctx.ask("answer", record, n=n)
        answers = [final_answer(t) for t in reply.texts]
        votes = Counter(a for a in answers if a is not None)
        if not votes:
            return []
        answer, top = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))
        agreement = top / n
        if top == n or agreement <= float(self.settings["min_agreement"]):
            return []  # unanimous: too easy; no majority: too hard
        return [{"question": record["question"], "type": "math", "answer": answer,
                 "votes": dict(votes), "agreement": agreement}]


_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def judge_score(text: str, score_max: float) -> Optional[float]:
    """The score of the last ``Score: N`` line, None when absent or out of range."""
    found = _SCORE.findall(text)
    if not found:
        return None
    score = float(found[-1])
    return score if 0 <= score <= score_max else None


class JudgePairs(Kind):
    steps = ("respond", "judge")
    defaults = {"responses": 4, "min_gap": 3.0, "score_max": 10}
    given = {"judge": {"response"}}

    async def run(self, ctx, record: dict) -> List[dict]:
        import asyncio

        reply = await ctx.ask("respond", record, n=int(self.settings["responses"]))
        responses = reply.texts
        judged = await asyncio.gather(*[ctx.ask("judge", {**record, "response": r})
                                        for r in responses])
        scores = [judge_score(j.text, float(self.settings["score_max"])) for j in judged]
        scored = [(s, k) for k, s in enumerate(scores) if s is not None]
        if len(scored) < 2:
            return []
        best, worst = max(scored), min(scored)
        gap = best[0] - worst[0]
        if gap < float(self.settings["min_gap"]):
            return []
        return [{"prompt": [{"role": "user", "content": record["prompt"]}],
                 "chosen": responses[best[1]], "rejected": responses[worst[1]],
                 "scores": scores, "gap": gap,
                 "unscored": sum(s is None for s in scores)}]


class Rewrite(Kind):
    steps = ("exercise", "solution")
    defaults: Dict[str, Any] = {}
    given = {"solution": {"exercise"}}

    async def run(self, ctx, record: dict) -> List[dict]:
        exercise = (await ctx.ask("exercise", record)).text.strip()
        solution = (await ctx.ask("solution", {**record, "exercise": exercise})).text.strip()
        if not exercise or not solution:
            return []
        return [{"messages": [{"role": "user", "content": exercise},
                              {"role": "assistant", "content": solution}]}]


KINDS = {"plurality_vote": PluralityVote, "judge_pairs": JudgePairs, "rewrite": Rewrite}

__all__ = ["KINDS", "JudgePairs", "PluralityVote", "Rewrite", "final_answer", "judge_score"]
