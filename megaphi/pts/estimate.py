"""p(success | prefix) from rollouts, and the token pair of a pivot.

A *backend* continues a prompt (token ids) with the policy's sampling settings and returns the
completions' token ids and log-probs (``sample(prompt_ids, n, seed)``): megaphi's ``InferenceModel`` or an
OpenAI-compatible endpoint. A *check* says whether a whole completion (the prefix plus the
rollout's continuation, token ids) solves the question: an oracle.

:class:`SuccessEstimator` draws ``rollouts`` continuations of ``query + prefix`` once per
distinct prefix (memoised, seeded from the prefix, so a rerun draws the same rollouts) and
keeps them: a pivot's accepted and rejected tokens are chosen among the first tokens of the
rollouts already drawn at its prefix (the report's footnote 7, :func:`token_pair`), and each
pair can be confirmed with fresh rollouts (:func:`confirm`).

Binomial noise: with ``N`` rollouts the standard error of an estimate ``p`` is
``sqrt(p (1 - p) / N)``, at most 0.5 / sqrt(N): 0.16 at N=10, 0.079 at N=40. A pivot compares
two independent estimates, whose difference has a standard error of up to 0.71 / sqrt(N)
(0.11 at N=40). Where p is flat near 0.5, a fake pivot of 0.2 at N=40 needs a 1.8-sigma
fluctuation, about 7% per pair of estimates compared (44% at N=10, under 1% at N=100), and
the search compares a few dozen per solution. Hence the defaults ``rollouts=40``,
``p_gap=0.2``, and the confirmation of every pair by fresh rollouts (another 2N), which a fake
passes only by fluctuating the same way again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

DEFAULT_ROLLOUTS = 40
DEFAULT_P_GAP = 0.2


class Backend(Protocol):
    def sample(self, prompt_ids: List[int], n: int,
               seed: int) -> List[Tuple[List[int], List[float]]]:
        """``n`` sampled continuations of ``prompt_ids``: token ids and their log-probs."""


@dataclass(frozen=True)
class Rollout:
    token_ids: Tuple[int, ...]  # the continuation after the prefix
    success: bool
    logprobs: Tuple[float, ...] = ()  # of each token under the policy


def prefix_seed(seed: int, prefix: Sequence[int], salt: str = "") -> int:
    """A 63-bit seed from the run's seed and a prefix (stable across runs and processes)."""
    digest = hashlib.sha256(f"{seed}:{salt}:{','.join(map(str, prefix))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SuccessEstimator:
    """p(success | query + prefix) as the fraction of ``rollouts`` continuations that ``check``
    accepts; one set of rollouts per distinct prefix.

    Args:
        backend: draws continuations (:class:`Backend`).
        check: ``check(completion_ids) -> bool`` for a whole completion (prefix +
            continuation), e.g. an oracle on its decoded text.
        query_ids: the prompt: the rendered query and the assistant header.
        rollouts: continuations per estimate (N).
        seed: the run's seed.
        stop_ids: the ids that end a completion: a prefix ending with one is a finished
            completion, whose p(success) is its own check (0 or 1), with no rollouts.
    """

    def __init__(self, backend: Backend, check: Callable[[List[int]], bool],
                 query_ids: Sequence[int], rollouts: int = DEFAULT_ROLLOUTS, seed: int = 0,
                 stop_ids: Sequence[int] = ()):
        if rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {rollouts}")
        self.backend, self.check, self.seed = backend, check, seed
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.query_ids, self.rollouts = list(query_ids), rollouts
        self._drawn: Dict[Tuple[str, Tuple[int, ...]], List[Rollout]] = {}
        self.rollouts_used = 0

    def draw(self, prefix: Sequence[int], salt: str = "") -> List[Rollout]:
        """The rollouts at ``prefix`` (drawn on first use; ``salt`` draws a fresh set)."""
        key = (salt, tuple(int(t) for t in prefix))
        if key not in self._drawn and key[1] and key[1][-1] in self.stop_ids:
            self._drawn[key] = [Rollout((), bool(self.check(list(key[1]))))]  # finished
        if key not in self._drawn:
            continuations = self.backend.sample(self.query_ids + list(key[1]), self.rollouts,
                                                prefix_seed(self.seed, key[1], salt))
            self.rollouts_used += len(continuations)
            self._drawn[key] = [Rollout(tuple(ids), bool(self.check(list(key[1]) + list(ids))),
                                        tuple(logprobs)) for ids, logprobs in continuations]
        return self._drawn[key]

    def __call__(self, prefix: Sequence[int], salt: str = "") -> float:
        drawn = self.draw(prefix, salt)
        return sum(r.success for r in drawn) / len(drawn)

    @property
    def estimates(self) -> int:
        return len(self._drawn)


def token_pair(estimator: SuccessEstimator, prefix: Sequence[int], token: int,
               delta: float) -> Optional[Tuple[int, int]]:
    """``(accepted, rejected)`` for the pivotal ``token`` after ``prefix``, chosen among the
    first tokens of the rollouts already drawn at ``prefix``: if the token raised p(success)
    (``delta > 0``) it is accepted and the rejected token is the most frequent first token of
    the failed rollouts (another token); if it lowered p(success) it is rejected and the
    accepted token is the most frequent first token of the successful ones. None when the
    rollouts offer no such token."""
    drawn = [r for r in estimator.draw(prefix) if r.token_ids]
    wanted = (lambda r: not r.success) if delta > 0 else (lambda r: r.success)
    counts = Counter(r.token_ids[0] for r in drawn if wanted(r) and r.token_ids[0] != token)
    if not counts:
        return None
    other = min(counts, key=lambda t: (-counts[t], t))  # most frequent, then smallest id
    return (token, other) if delta > 0 else (other, token)


def confirm(estimator: SuccessEstimator, prefix: Sequence[int], pair: Tuple[int, int],
            p_gap: float) -> Tuple[bool, float, float]:
    """Re-estimate p(success) after the accepted and after the rejected token with fresh
    rollouts; the pair holds if the accepted token's exceeds the rejected one's by ``p_gap``.
    Returns ``(holds, p_accepted, p_rejected)``."""
    accepted = estimator(list(prefix) + [pair[0]], salt="confirm")
    rejected = estimator(list(prefix) + [pair[1]], salt="confirm")
    return accepted - rejected >= p_gap, accepted, rejected


__all__ = ["Backend", "DEFAULT_P_GAP", "DEFAULT_ROLLOUTS", "Rollout", "SuccessEstimator",
           "confirm", "prefix_seed", "token_pair"]
