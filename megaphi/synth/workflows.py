"""The logic of each workflow kind (the ``kind`` of a workflow YAML file).

Each kind names its request ``steps`` (one template each), its ``settings`` with defaults, and
``run(ctx, record)``, which makes its requests through ``ctx.ask`` and returns the records the
item produces (none when the item is filtered out).

- ``plurality_vote`` (question curation, report §2): ``samples`` answers per question; the
  final answer of each (the last ``\\boxed{...}``, else the text after the last "answer is" or
  "Answer:") normalised (spaces, a trailing period, ``$``, case and a leading ``x =`` removed)
  and counted; with ``equivalence: math`` (the default) distinct answers that math-verify
  finds equal (``\\frac{1}{2}`` and ``0.5``) are one vote group, named by its most common
  form (``equivalence: string`` counts the normalised strings only).
  A question whose answers all agree is too easy and one whose most common answer has no more
  than ``min_agreement`` of the votes is too hard: both are dropped. The others keep the
  majority answer as pseudo ground truth, written as a Pivotal Token Search question
  (``{"id", "question", "type": "math", "answer", "votes", "agreement"}``; ``votes`` counts
  each normalised form).
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
- ``seed_curation`` (report §2, two stages): the ``page`` template scores a page's
  educational value (``Score: N``); pages under ``page_threshold`` are dropped; the rest are
  split at blank lines into passages of at most ``passage_chars``, each scored by the
  ``passage`` template (``Factual: N``, ``Reasoning: N``, ``Complexity: low|medium|high``,
  ``Obscurity: low|medium|high``); passages reaching both thresholds are kept with their scores
  and tags (``{"id": "PAGE/k", "text", "scores", "tags"}``, text data or seeds for ``rewrite``).
- ``self_revision`` (report §2): a draft, then up to ``max_rounds`` rounds of a critique
  against the rubric of the ``critique`` template (ending ``Verdict: PASS`` or
  ``Verdict: REVISE``) and a revision, stopping when the critique passes; every round is
  recorded. Written as an SFT conversation with the final response (``passed`` false and kept
  only with ``keep_unpassed``).
- ``instruction_reversal`` (report §2, code): code -> an instruction (``instruct``) -> code
  regenerated from the instruction (``regenerate``). With the input's ``tests`` the pair is
  kept when the regenerated code passes them in the sandbox (round-trip correctness); without,
  when the normalised-AST similarity of the two programs (:func:`ast_similarity`) reaches
  ``similarity_threshold``, with the score and threshold recorded. Written instruction first:
  ``{"instruction", "code", "messages": [user: instruction, assistant: code], "fidelity"}``.
- ``execution_validation``: no requests; each input's ``code`` with its ``tests`` runs in the
  sandbox (``megaphi/sandbox.py``) and what passes is kept.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, List, Optional

from megaphi.synth.client import SynthError


class Kind:
    steps: tuple = ()
    needs_sandbox = False
    """Runs generated code (bubblewrap must work here; checked before any request)."""
    defaults: Dict[str, Any] = {}
    given: Dict[str, set] = {}
    """Per step, the template fields the workflow fills in itself (the rest come from input)."""

    def __init__(self, settings: Dict[str, Any]):
        self.settings = settings

    @classmethod
    def check_settings(cls, settings: Dict[str, Any]) -> None:
        """Refuse a setting's value (:class:`SynthError`); the names are checked already."""

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


def group_answers(votes: Counter, equal) -> List[tuple]:
    """Vote groups ``[(answer, count)]``, most votes first: each distinct answer joins the
    first group whose answer ``equal`` says it equals (groups are named by their most common
    form, ties by the smallest string)."""
    groups: List[list] = []
    for answer, count in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0])):
        for group in groups:
            if equal(answer, group[0]):
                group[1] += count
                break
        else:
            groups.append([answer, count])
    return sorted(map(tuple, groups), key=lambda g: (-g[1], g[0]))


def _math_equal(answer: str, gold: str) -> bool:
    from megaphi.oracles import math_equal

    return math_equal(answer, gold).correct


class PluralityVote(Kind):
    steps = ("answer",)
    defaults = {"samples": 8, "min_agreement": 0.5, "equivalence": "math"}

    @classmethod
    def check_settings(cls, settings: Dict[str, Any]) -> None:
        if settings["equivalence"] not in ("math", "string"):
            raise SynthError(f"settings.equivalence must be math or string, got "
                             f"{settings['equivalence']!r}")

    async def run(self, ctx, record: dict) -> List[dict]:
        import asyncio

        n = int(self.settings["samples"])
        reply = await ctx.ask("answer", record, n=n)
        answers = [final_answer(t) for t in reply.texts]
        votes = Counter(a for a in answers if a is not None)
        if not votes:
            return []
        if self.settings["equivalence"] == "math" and len(votes) > 1:
            # math-verify runs in worker processes; keep the event loop free meanwhile
            groups = await asyncio.to_thread(group_answers, votes, _math_equal)
        else:
            groups = group_answers(votes, str.__eq__)
        answer, top = groups[0]
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


_FIELD = r"{}\s*[:=]\s*(\w+(?:\.\d+)?)"


def labelled(text: str, name: str) -> Optional[str]:
    """The value of the last ``Name: value`` line of ``text`` (case-insensitive), or None."""
    found = re.findall(_FIELD.format(re.escape(name)), text, re.IGNORECASE)
    return found[-1].lower() if found else None


def number(text: str, name: str, high: float) -> Optional[float]:
    value = labelled(text, name)
    try:
        score = float(value) if value is not None else None
    except ValueError:
        return None
    return score if score is not None and 0 <= score <= high else None


def passages(text: str, max_chars: int) -> List[str]:
    """``text`` split at blank lines into passages of at most ``max_chars`` (paragraphs are
    joined while they fit; a longer paragraph is its own passage)."""
    out, current = [], ""
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


class SeedCuration(Kind):
    steps = ("page", "passage")
    defaults = {"page_threshold": 6, "factual_threshold": 6, "reasoning_threshold": 6,
                "score_max": 10, "passage_chars": 1500}
    given = {"passage": {"passage"}}

    async def run(self, ctx, record: dict) -> List[dict]:
        import asyncio

        top = float(self.settings["score_max"])
        page = number((await ctx.ask("page", record)).text, "score", top)
        if page is None or page < float(self.settings["page_threshold"]):
            return []
        chunks = passages(record["text"], int(self.settings["passage_chars"]))
        replies = await asyncio.gather(*[ctx.ask("passage", {**record, "passage": c})
                                         for c in chunks])
        out = []
        for k, (chunk, reply) in enumerate(zip(chunks, replies)):
            factual = number(reply.text, "factual", top)
            reasoning = number(reply.text, "reasoning", top)
            if factual is None or reasoning is None:
                continue
            if (factual >= float(self.settings["factual_threshold"])
                    and reasoning >= float(self.settings["reasoning_threshold"])):
                out.append({"id": f"{record['id']}/{k}", "text": chunk,
                            "scores": {"page": page, "factual": factual,
                                       "reasoning": reasoning},
                            "tags": {"complexity": labelled(reply.text, "complexity"),
                                     "obscurity": labelled(reply.text, "obscurity")}})
        return out


class SelfRevision(Kind):
    steps = ("draft", "critique", "revise")
    defaults = {"max_rounds": 3, "keep_unpassed": False}
    given = {"critique": {"response"}, "revise": {"response", "critique"}}

    async def run(self, ctx, record: dict) -> List[dict]:
        response = (await ctx.ask("draft", record)).text
        rounds, passed = [], False
        for _ in range(int(self.settings["max_rounds"])):
            critique = (await ctx.ask("critique", {**record, "response": response})).text
            verdict = labelled(critique, "verdict")
            rounds.append({"response": response, "critique": critique, "verdict": verdict})
            if verdict == "pass":
                passed = True
                break
            response = (await ctx.ask("revise", {**record, "response": response,
                                                  "critique": critique})).text
        if not passed:
            rounds.append({"response": response, "critique": None, "verdict": None})
            if not self.settings["keep_unpassed"]:
                return []
        return [{"messages": [{"role": "user", "content": record["prompt"]},
                              {"role": "assistant", "content": response}],
                 "passed": passed, "rounds": rounds}]


def code_of(text: str) -> str:
    """The first fenced code block of a reply (``` or ```python), else the whole reply."""
    found = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)```", text, re.DOTALL)
    return (found.group(1) if found else text).strip("\n")


def ast_similarity(a: str, b: str) -> float:
    """Similarity of two Python programs after normalisation: parsed, docstrings dropped,
    every identifier renamed by order of first appearance, compared as the sequences of their
    AST dumps' tokens (difflib ratio, 0 to 1). 0 when either does not parse."""
    import ast
    import difflib

    def normal(code: str) -> List[str]:
        tree = ast.parse(code)
        names: Dict[str, str] = {}

        def canon(name: str) -> str:
            return names.setdefault(name, f"v{len(names)}")

        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(getattr(body[0], "value", None), ast.Constant)
                    and isinstance(body[0].value.value, str)):
                body.pop(0)  # a docstring
            if isinstance(node, ast.Name):
                node.id = canon(node.id)
            elif isinstance(node, ast.arg):
                node.arg = canon(node.arg)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                node.name = canon(node.name)
        return re.findall(r"\w+|[^\w\s]", ast.dump(tree, annotate_fields=False))

    try:
        x, y = normal(a), normal(b)
    except (SyntaxError, ValueError, RecursionError):
        return 0.0
    return difflib.SequenceMatcher(None, x, y, autojunk=False).ratio()


async def sandboxed(code: str, tests: str):
    """``code + tests`` in the bubblewrap sandbox, off the event loop."""
    import asyncio

    from megaphi.sandbox import check_code

    return await asyncio.to_thread(check_code, code, tests)


class InstructionReversal(Kind):
    steps = ("instruct", "regenerate")
    defaults = {"similarity_threshold": 0.8}
    given = {"regenerate": {"instruction"}}
    needs_sandbox = True

    async def run(self, ctx, record: dict) -> List[dict]:
        instruction = (await ctx.ask("instruct", record)).text.strip()
        regenerated = code_of((await ctx.ask("regenerate", {**record,
                                                             "instruction": instruction})).text)
        tests = record.get("tests")
        if tests:
            result = await sandboxed(regenerated, tests)
            fidelity = {"method": "tests", "passed": result.passed, "reason": result.reason}
            keep = result.passed
        else:
            threshold = float(self.settings["similarity_threshold"])
            score = ast_similarity(record["code"], regenerated)
            fidelity = {"method": "ast_similarity", "score": score, "threshold": threshold}
            keep = score >= threshold
        if not keep or not instruction:
            return []
        return [{"instruction": instruction, "code": record["code"],
                 "messages": [{"role": "user", "content": instruction},
                              {"role": "assistant", "content": record["code"]}],
                 "regenerated": regenerated, "fidelity": fidelity}]


class ExecutionValidation(Kind):
    steps = ()
    defaults: Dict[str, Any] = {}
    needs_sandbox = True

    def check_input(self, record: dict, spec) -> None:
        for key in ("code", "tests"):
            if not isinstance(record.get(key), str):
                raise SynthError(f"{record['_where']}: execution_validation needs a \"{key}\" "
                                 "string")

    async def run(self, ctx, record: dict) -> List[dict]:
        result = await sandboxed(record["code"], record["tests"])
        if not result.passed:
            return []
        return [{**{k: v for k, v in record.items() if k != "id"},
                 "validation": {"passed": True, "wall_s": result.wall_s}}]


KINDS = {"plurality_vote": PluralityVote, "judge_pairs": JudgePairs, "rewrite": Rewrite,
         "seed_curation": SeedCuration, "self_revision": SelfRevision,
         "instruction_reversal": InstructionReversal,
         "execution_validation": ExecutionValidation}

__all__ = ["KINDS", "ExecutionValidation", "InstructionReversal", "JudgePairs", "PluralityVote",
           "Rewrite", "SeedCuration", "SelfRevision", "ast_similarity", "code_of",
           "final_answer", "judge_score", "labelled", "passages"]
