"""Pivotal Token Search (Phi-4 report §4.3, Figure 4): the tokens of a sampled solution where
the probability of success jumps.

For a query with a checkable answer and one sampled completion ``t_1 .. t_n`` (token ids, with
their log-probs under the policy), ``p(k)`` is the probability that the policy succeeds when it
continues from the query plus the first ``k`` tokens. A token ``t_k`` is *pivotal* when
``|p(k) - p(k - 1)| >= p_gap``. Checking every token costs ``n + 1`` estimates of ``p``, each
``N`` rollouts; Figure 4 bisects instead::

    Subdivide(prefix, T):
        if |T| <= 1 or |p(prefix) - p(prefix + T)| < p_gap: return [T]
        T_left, T_right = split T at the midpoint of cumulative token log-probability
        return Subdivide(prefix, T_left) + Subdivide(prefix + T_left, T_right)

and reports every single-token segment whose two ends differ by ``p_gap`` or more. A segment
whose ends are close is not searched further, so the search finds every pivot only where
``p`` is near-monotone along the completion (the report's assumption): a rise and a fall of the
same size inside one segment cancel out and both are missed. With ``k`` pivots in ``n`` tokens
it needs about ``2 + 2 k log2(n)`` estimates. Splitting at the log-probability midpoint rather
than the token midpoint puts the boundaries around the unlikely tokens, where pivots are.

:func:`pivotal_tokens` is the search over one completion, in token ids end to end; it calls
``p_success`` once per distinct prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple


@dataclass(frozen=True)
class Pivot:
    """A pivotal token: ``token_ids[index]``, with p(success) before and after it."""

    index: int
    """Its position in the completion's ``token_ids``; its prefix is ``token_ids[:index]``."""
    p_before: float
    """p(success | query + ``token_ids[:index]``)."""
    p_after: float
    """p(success | query + ``token_ids[:index + 1]``)."""

    @property
    def delta(self) -> float:
        return self.p_after - self.p_before


def split_point(token_logprobs: Sequence[float], start: int, end: int) -> int:
    """Where Figure 4 splits the segment ``[start, end)`` (at least 2 tokens): the boundary
    ``m`` in ``start + 1 .. end - 1`` whose cumulative log-prob ``sum(token_logprobs[start:m])``
    is nearest half the segment's total (the first such boundary on a tie). A segment of
    certain tokens (total log-prob 0) is split at its token midpoint."""
    if end - start < 2:
        raise ValueError(f"segment [{start}, {end}) has fewer than 2 tokens")
    total = math.fsum(token_logprobs[start:end])
    if total > -1e-12:
        return (start + end) // 2
    best, best_gap, acc = start + 1, math.inf, 0.0
    for m in range(start + 1, end):
        acc += token_logprobs[m - 1]
        gap = abs(acc - total / 2)
        if gap < best_gap:
            best, best_gap = m, gap
    return best


def subdivide(token_logprobs: Sequence[float], p: Callable[[int], float], p_gap: float,
              split: Callable[[Sequence[float], int, int], int] = split_point
              ) -> List[Tuple[int, int]]:
    """Figure 4's ``Subdivide(empty, completion)``: the segments ``[start, end)`` of the
    completion, in order, given ``p(k)`` = p(success | the first ``k`` tokens).

    ``split(token_logprobs, start, end)`` chooses where a segment of at least 2 tokens is cut
    (a boundary in ``start + 1 .. end - 1``): Figure 4's cumulative log-prob midpoint
    (:func:`split_point`) unless another rule is compared, e.g. the token midpoint
    (``megaphi/pts/benchmark.py``)."""
    out: List[Tuple[int, int]] = []
    stack = [(0, len(token_logprobs))]
    while stack:  # depth-first, left segment first: the segments come out in order
        start, end = stack.pop()
        if end - start <= 1 or abs(p(start) - p(end)) < p_gap:
            out.append((start, end))
            continue
        middle = split(token_logprobs, start, end)
        stack.append((middle, end))
        stack.append((start, middle))
    return out


def pivotal_tokens(token_ids: Sequence[int], token_logprobs: Sequence[float],
                   p_success: Callable[[List[int]], float], p_gap: float = 0.2) -> List[Pivot]:
    """The pivotal tokens of one sampled completion (Figure 4).

    Args:
        token_ids: the completion's token ids (after the query and the assistant header).
        token_logprobs: each token's log-prob under the policy that sampled it.
        p_success: ``p_success(prefix_ids)`` estimates p(success | query + assistant header +
            ``prefix_ids``), e.g. the fraction of rollouts from there that an oracle accepts.
            Called once per distinct prefix (memoised here).
        p_gap: the smallest change of p(success) that makes a token pivotal.

    Returns:
        The pivots in order of position.
    """
    ids = [int(t) for t in token_ids]
    if len(ids) != len(token_logprobs):
        raise ValueError(f"{len(ids)} token ids but {len(token_logprobs)} log-probs")
    if not 0.0 < p_gap <= 1.0:
        raise ValueError(f"p_gap must be in (0, 1], got {p_gap}")
    memo: Dict[int, float] = {}

    def p(k: int) -> float:  # every prefix is a prefix of this completion: key by length
        if k not in memo:
            memo[k] = float(p_success(ids[:k]))
        return memo[k]

    pivots = []
    for start, end in subdivide(list(token_logprobs), p, p_gap):
        if end - start == 1 and abs(p(end) - p(start)) >= p_gap:
            pivots.append(Pivot(index=start, p_before=p(start), p_after=p(end)))
    return pivots


__all__ = ["Pivot", "pivotal_tokens", "split_point", "subdivide"]
