"""Pivotal Token Search (Phi-4 report §4.3): :func:`pivotal_tokens` finds the tokens of a
sampled solution where p(success) jumps (:mod:`megaphi.pts.search`)."""

from megaphi.pts.search import Pivot, pivotal_tokens, split_point, subdivide

__all__ = ["Pivot", "pivotal_tokens", "split_point", "subdivide"]
