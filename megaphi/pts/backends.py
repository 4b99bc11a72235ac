"""Rollout backends for Pivotal Token Search: they continue a prompt of token ids with the
policy's sampling settings and return the continuations' token ids (``complete``), or the
ids with each token's log-prob (``sample``).

- :class:`MegaphiBackend`: a megaphi checkpoint in this process (``InferenceModel``), the ``n``
  rollouts of a prompt sampled as one batch on one KV cache.
- :class:`OpenAIBackend`: any OpenAI-compatible completions endpoint that takes prompt token
  ids and returns token ids (vLLM and SGLang with ``return_token_ids``, ``megaphi-serve``),
  through the ``openai`` client. The API key comes from an environment variable.

Both take the same :class:`Sampling`, so with ``megaphi-serve`` behind it the ``openai``
backend returns what the ``megaphi`` backend returns for the same seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Sampling:
    """The policy's sampling settings for rollouts."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_ids: Sequence[int] = field(default_factory=tuple)
    """A rollout ends after any of these ids (Phi-4: ``<|im_end|>``, ``<|endoftext|>``)."""

    def budget(self, prompt_length: int, context: Optional[int]) -> int:
        """New tokens a rollout of a ``prompt_length``-token prompt gets: ``max_new_tokens``,
        at most what the model's ``context`` leaves (unbounded when it is None); below 1, the
        rollout is empty."""
        if context is None:
            return self.max_new_tokens
        return min(self.max_new_tokens, context - prompt_length)


Completion = Tuple[List[int], List[float]]
"""A sampled continuation: its token ids and each token's log-prob under the policy."""


class MegaphiBackend:
    """Rollouts from an :class:`~megaphi.inference.InferenceModel` in this process."""

    def __init__(self, model, sampling: Sampling):
        self.model, self.sampling = model, sampling

    def sample(self, prompt_ids: List[int], n: int, seed: int) -> List[Completion]:
        s = self.sampling
        budget = s.budget(len(prompt_ids), self.model.config.model.seq_length)
        if budget < 1:
            return [([], []) for _ in range(n)]
        out = self.model.generate(prompt_ids, max_new_tokens=budget, temperature=s.temperature,
                                  top_p=s.top_p, stop_ids=s.stop_ids, seed=seed,
                                  num_samples=n)
        return [(g.token_ids, g.logprobs) for g in out]

    def complete(self, prompt_ids: List[int], n: int, seed: int) -> List[List[int]]:
        return [ids for ids, _ in self.sample(prompt_ids, n, seed)]


class OpenAIBackend:
    """Rollouts from an OpenAI-compatible ``/v1/completions`` endpoint, prompt as token ids.

    Args:
        endpoint: the base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name.
        sampling: the sampling settings.
        api_key_env: the environment variable holding the API key (none needed if unset).
    """

    def __init__(self, endpoint: str, model: str, sampling: Sampling,
                 api_key_env: Optional[str] = "OPENAI_API_KEY", timeout_s: float = 600.0):
        from openai import OpenAI

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.client = OpenAI(base_url=endpoint, api_key=key or "none", timeout=timeout_s,
                             max_retries=3)
        self.model, self.sampling = model, sampling
        self._context: Optional[int] = None

    def context_length(self) -> Optional[int]:
        """The served model's context (``max_model_len`` of ``/v1/models``, as vLLM and
        megaphi-serve report it), or None when the endpoint does not say."""
        if self._context is None:
            try:
                card = self.client.models.retrieve(self.model)
                self._context = int(getattr(card, "max_model_len", None) or 0)
            except Exception:  # an endpoint without /v1/models/{name}: no clamping
                self._context = 0
        return self._context or None

    def sample(self, prompt_ids: List[int], n: int, seed: int) -> List[Completion]:
        s = self.sampling
        budget = s.budget(len(prompt_ids), self.context_length())
        if budget < 1:
            return [([], []) for _ in range(n)]
        response = self.client.completions.create(
            model=self.model, prompt=list(prompt_ids), n=n, seed=seed,
            temperature=s.temperature, top_p=s.top_p, max_tokens=budget, logprobs=0,
            extra_body={"return_token_ids": True, "stop_token_ids": list(s.stop_ids),
                        "skip_special_tokens": False})
        out = []
        for choice in sorted(response.choices, key=lambda c: c.index):
            ids = getattr(choice, "token_ids", None)
            if ids is None:
                raise RuntimeError(f"{self.client.base_url} returned no token ids; the "
                                   "endpoint must support return_token_ids (vLLM, SGLang, "
                                   "megaphi-serve)")
            logprobs = choice.logprobs.token_logprobs if choice.logprobs else None
            if logprobs is None or len(logprobs) != len(ids):
                raise RuntimeError(f"{self.client.base_url} returned no log-prob per token")
            out.append(([int(t) for t in ids], [float(x) for x in logprobs]))
        return out

    def complete(self, prompt_ids: List[int], n: int, seed: int) -> List[List[int]]:
        return [ids for ids, _ in self.sample(prompt_ids, n, seed)]


__all__ = ["Completion", "MegaphiBackend", "OpenAIBackend", "Sampling"]
