"""Pivotal Token Search (Phi-4 report §4.3): :func:`pivotal_tokens` finds the tokens of a
sampled solution where p(success) jumps (:mod:`megaphi.pts.search`); rollouts estimate
p(success) and choose each pivot's token pair (:mod:`megaphi.pts.estimate`)."""

from megaphi.pts.estimate import SuccessEstimator, confirm, token_pair
from megaphi.pts.search import Pivot, pivotal_tokens, split_point, subdivide

__all__ = ["Pivot", "SuccessEstimator", "confirm", "pivotal_tokens", "split_point", "subdivide",
           "token_pair"]
