"""Benchmarks of Pivotal Token Search: rollout speed, and the cost of the search itself.

:func:`run_rollouts` times rollouts, PTS's unit of work (each estimate of p(success) is ``N``
continuations of one prefix with their token log-probs), from the ``megaphi`` backend
(:class:`~megaphi.pts.backends.MegaphiBackend` on an :class:`~megaphi.inference.InferenceModel`:
the ``n`` rollouts as one batch on one KV cache) against Hugging Face transformers' ``generate``
(:class:`HFBackend`) on the same weights (the checkpoint exported with
:func:`~megaphi.hf.convert.export_hf_checkpoint`), prompt, batch, sampling settings and
length, in one process, the two arms interleaved.

:func:`compare_splits` counts the estimates the search needs on planted completions
(:func:`planted_completion`): Figure 4's split at the cumulative log-prob midpoint
(:func:`~megaphi.pts.search.pivotal_tokens`) against the same bisection split at the token
midpoint (:func:`token_midpoint`, codelion/pts's choice), through
:func:`~megaphi.pts.search.subdivide`'s ``split`` argument.

``tools/benchmark_pts.py`` is the command line. Every function returns figures; none asserts
a speed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megaphi.config.schema import ConfigError
from megaphi.pts.backends import Completion, MegaphiBackend, Sampling
from megaphi.pts.estimate import DEFAULT_P_GAP
from megaphi.pts.search import pivotal_tokens, subdivide

logger = logging.getLogger("megaphi.pts.benchmark")

DEFAULT_PROMPT = ("A train leaves at 3:40 pm and arrives at 6:15 pm. How many minutes does "
                  "the trip take? Think step by step.")
PLANTED_LENGTHS = (64, 256, 512)
PLANTED_PIVOTS = (1, 2, 4)
PLANTED_SEEDS = 5
P_NOISE = 0.01
"""Amplitude of the noise added to the planted p(success) of every prefix."""


# --------------------------------------------------------------------------------------------
# Rollouts per second: megaphi against transformers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def plain_torch():
    """Run transformers as in a process of its own: without megaphi's CPU compatibility layer
    (:func:`megaphi.platform.install_cpu_compat`, a torch function mode that every torch call
    in the process goes through once a megaphi model has run on the CPU; megaphi's own CPU
    path needs it, transformers does not). A no-op when it is not installed."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    from megaphi.platform import _CudaToCpuMode

    stack = _get_current_function_mode_stack()
    if stack and isinstance(stack[-1], _CudaToCpuMode):
        with _pop_mode_temporarily():
            yield
    else:
        yield


class HFBackend:
    """Rollouts from a ``transformers`` causal LM's ``generate``, with the interface of
    :class:`~megaphi.pts.backends.MegaphiBackend`: ``n`` continuations of a prompt as one batch
    (``num_return_sequences``) with each token's log-prob under the model (temperature 1, no
    top-p: from the raw logits, ``output_logits=True``, which keeps ``n x max_new_tokens``
    rows of vocabulary logits until the end). Without stop ids there is no end of
    sequence (``eos_token_id=None``: no stopping criterion, no logits processor for it) and
    every rollout is exactly ``max_new_tokens`` long; with them a rollout ends after the
    first. Runs under :func:`plain_torch`."""

    def __init__(self, model, sampling: Sampling, device: torch.device):
        self.model, self.sampling, self.device = model, sampling, device

    @torch.no_grad()
    def sample(self, prompt_ids: List[int], n: int, seed: int) -> List[Completion]:
        s = self.sampling
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)  # [1, s]
        kwargs = dict(max_new_tokens=s.max_new_tokens, num_return_sequences=n,
                      return_dict_in_generate=True, output_logits=True,
                      pad_token_id=self.model.config.pad_token_id,
                      eos_token_id=list(s.stop_ids) or None)
        if s.temperature == 0.0:
            kwargs["do_sample"] = False
        else:  # top_k=0: no top-k filter (transformers' default keeps 50), as megaphi samples
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        with plain_torch():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      **kwargs)
            new = out.sequences[:, ids.shape[1]:]  # [n, t]
            logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1)  # step: [n, V]
                                    .gather(-1, new[:, i:i + 1])[:, 0]
                                    for i, step in enumerate(out.logits)], dim=1)  # [n, t]
        stops = set(int(t) for t in s.stop_ids)
        results = []
        for row_ids, row_lp in zip(new.tolist(), logprobs.tolist()):
            end = next((i + 1 for i, t in enumerate(row_ids) if t in stops), len(row_ids))
            results.append((row_ids[:end], row_lp[:end]))
        return results


def prompt_ids(tokenizer, prompt: str = DEFAULT_PROMPT) -> List[int]:
    """``prompt`` as one user turn in Phi-4's chat format, with the assistant header."""
    from megaphi.data.chat import render_chat

    ids, _ = render_chat([{"role": "user", "content": prompt}], tokenizer,
                         add_generation_prompt=True)
    return ids


@dataclass(frozen=True)
class RolloutPlan:
    """What :func:`run_rollouts` runs, checked before any weight is read."""

    checkpoint: Path
    """The ``iter_*`` directory."""
    prompt_ids: List[int]
    seq_length: int


def plan_rollouts(checkpoint: str, max_new_tokens: int,
                  prompt: str = DEFAULT_PROMPT) -> RolloutPlan:
    """Check that ``checkpoint`` is a megaphi checkpoint that transformers can load (once
    exported) and that the prompt plus ``max_new_tokens`` fit its context.

    Raises:
        ConfigError: the model cannot be exported or the rollouts do not fit its context.
        ValueError: not a megaphi checkpoint (``CheckpointNotFound``), or its tokenizer has
            no Phi-4 chat tokens (``ChatFormatError``); the message names the path and fix.
    """
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.hf.mapping import hf_config_from_model
    from megaphi.inference import checkpoint_config, resolve_checkpoint

    iter_dir = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(iter_dir)
    hf_config_from_model(cfg.model, "float32")  # refuses what transformers cannot express
    ids = prompt_ids(load_tokenizer(cfg.data.tokenizer), prompt)
    seq = cfg.model.seq_length
    if len(ids) + max_new_tokens > seq:
        raise ConfigError("--max-new-tokens", f"the prompt ({len(ids)} tokens) plus "
                          f"{max_new_tokens} new tokens exceed the context of {checkpoint} "
                          f"({seq} tokens, model.seq_length)",
                          f"pass --max-new-tokens {seq - len(ids)} or less")
    return RolloutPlan(iter_dir, ids, seq)


def random_checkpoint(out: Path, preset: str = "tiny", seq_length: Optional[int] = None,
                      seed: int = 1234) -> Path:
    """Write a megaphi checkpoint of ``preset`` with its random initial weights (the
    layout-independent init of training, ``train.seed`` = ``seed``) into ``out`` (a
    checkpoints directory: ``iter_0000000`` and ``latest``), in this process. Rollout speed
    does not depend on what the weights are, so no training is needed."""
    from megaphi.config import load_config
    from megaphi.hf.convert import ITERATION_DIR, save_model_checkpoint
    from megaphi.inference import SingleProcessRuntime
    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights

    overrides = [f"train.seed={seed}"]
    if seq_length is not None:
        overrides.append(f"model.seq_length={seq_length}")
    cfg = load_config(preset=preset, overrides=overrides)
    logger.info("writing a %s model with random weights (%d layers, hidden %d, seq_length %d) "
                "to %s", preset, cfg.model.num_layers, cfg.model.hidden_size,
                cfg.model.seq_length, out)
    (Path(out) / ITERATION_DIR).mkdir(parents=True)
    SingleProcessRuntime.acquire(seed=seed)
    try:
        chunks = build_model(cfg, use_te=False, device=torch.device("cpu"))
        initialize_weights(chunks, cfg.model, seed=seed)
        save_model_checkpoint(chunks, Path(out), cfg, {"format": "random-init", "preset": preset})
    finally:
        SingleProcessRuntime.release()
    return Path(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_arms(arms: Dict[str, object], prompt: List[int], n: int, repeats: int, warmup: int,
              device: torch.device, seed: int = 0) -> Dict[str, dict]:
    """Time ``arm.sample(prompt, n, seed)`` of each arm: ``warmup`` untimed calls of each, then
    ``repeats`` repetitions, each one call of every arm, in turn (the order reversed every
    other repetition, so a change in the machine's load or a cache warmed by the previous arm
    favours neither). Every arm gets the same seed in a repetition.

    Returns:
        Per arm: ``times_s`` (per repetition), ``tokens`` (generated tokens per batch),
        ``batch_time_s`` (the median time), ``rollouts_per_s`` (``n`` over it),
        ``tokens_per_s`` (the median batch's tokens over it), and ``best_batch_time_s`` and
        ``best_rollouts_per_s`` (the fastest repetition: the least disturbed by other work).
    """
    names = list(arms)
    for i in range(warmup):
        logger.info("warm-up %d of %d: %s", i + 1, warmup, ", ".join(names))
        for name in names:
            arms[name].sample(prompt, n, seed + i)
    times: Dict[str, List[float]] = {name: [] for name in names}
    tokens: Dict[str, List[int]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            out = arms[name].sample(prompt, n, seed + warmup + r)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            tokens[name].append(sum(len(ids) for ids, _ in out))
        logger.info("repetition %d of %d: %s", r + 1, repeats, ", ".join(
            f"{name} {times[name][-1]:.2f} s ({n / times[name][-1]:.1f} rollouts/s)"
            for name in names))
    result = {}
    for name in names:
        median, best = statistics.median(times[name]), min(times[name])
        result[name] = {"batch_time_s": median, "rollouts_per_s": n / median,
                        "tokens_per_s": statistics.median(tokens[name]) / median,
                        "best_batch_time_s": best, "best_rollouts_per_s": n / best,
                        "tokens": tokens[name], "times_s": times[name]}
    return result


@torch.no_grad()
def _logprob_parity(hf_model, prompt: List[int], completion: Completion,
                    device: torch.device) -> float:
    """The largest difference between megaphi's log-probs of a rollout and those transformers
    gives the same tokens in one forward pass: near 0 when both arms run the same model."""
    ids, logprobs = completion
    full = torch.tensor([list(prompt) + list(ids)], device=device)  # [1, s + t]
    with plain_torch():
        logits = hf_model(full).logits[0, len(prompt) - 1:-1].float()  # [t, V]
    theirs = torch.log_softmax(logits, dim=-1).gather(-1, full[0, len(prompt):, None])[:, 0]
    return float((theirs.cpu() - torch.tensor(logprobs)).abs().max())


def run_rollouts(plan: RolloutPlan, work_dir: Path, rollouts: int = 16,
                 max_new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 device: str = "cpu") -> dict:
    """Rollouts per second of the ``megaphi`` backend and of transformers' ``generate`` on the
    same model in fp32 (the checkpoint of ``plan``, exported into ``work_dir``), both sampling
    ``rollouts`` continuations of ``plan.prompt_ids`` as one batch, exactly ``max_new_tokens``
    each (no stop ids), with every token's log-prob; timed by :func:`time_arms`.

    Returns:
        The settings, ``megaphi`` and ``hf`` (:func:`time_arms`' figures), ``ratio`` (megaphi's
        rollouts/s over transformers', medians) and ``best_ratio`` (of the fastest batches),
        ``logprob_max_abs_diff`` (:func:`_logprob_parity`) and ``threads``
        (``torch.get_num_threads()``).
    """
    from transformers import AutoModelForCausalLM

    from megaphi.hf.convert import export_hf_checkpoint
    from megaphi.inference import InferenceModel

    dev = torch.device(device)
    sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        stop_ids=())
    hf_dir = Path(work_dir) / "hf"
    logger.info("exporting %s to transformers' format in %s", plan.checkpoint, hf_dir)
    export_hf_checkpoint(str(plan.checkpoint), str(hf_dir), dtype="fp32")
    with InferenceModel.from_checkpoint(plan.checkpoint, device=device, dtype="fp32") as model:
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        hf_model = hf_model.to(dev).eval()
        arms = {"megaphi": MegaphiBackend(model, sampling),
                "hf": HFBackend(hf_model, sampling, dev)}
        first = arms["megaphi"].sample(plan.prompt_ids, 1, seed)[0]
        parity = _logprob_parity(hf_model, plan.prompt_ids, first, dev)
        logger.info("the two arms' log-probs of one rollout differ by at most %.2g", parity)
        timed = time_arms(arms, plan.prompt_ids, rollouts, repeats, warmup, dev, seed)
        attention = getattr(hf_model.config, "_attn_implementation", None)
        m = model.config.model
        shape = {"layers": m.num_layers, "hidden_size": m.hidden_size,
                 "vocab_size": m.vocab_size, "seq_length": m.seq_length}
    for name, figures in timed.items():
        if any(t != rollouts * max_new_tokens for t in figures["tokens"]):
            logger.warning("%s generated %s tokens per batch, not %d: the arms did unequal "
                           "work", name, figures["tokens"], rollouts * max_new_tokens)
    return {"checkpoint": str(plan.checkpoint), "model": shape, "device": dev.type,
            "threads": torch.get_num_threads(), "prompt_tokens": len(plan.prompt_ids),
            "rollouts": rollouts, "max_new_tokens": max_new_tokens, "repeats": repeats,
            "warmup": warmup, "temperature": temperature, "top_p": top_p,
            "hf_attention": attention, "logprob_max_abs_diff": parity, **timed,
            "ratio": timed["megaphi"]["rollouts_per_s"] / timed["hf"]["rollouts_per_s"],
            "best_ratio": (timed["megaphi"]["best_rollouts_per_s"]
                           / timed["hf"]["best_rollouts_per_s"])}


# --------------------------------------------------------------------------------------------
# Estimates per pivot: log-prob midpoint against token midpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlantedCompletion:
    """A completion whose p(success | prefix) jumps at known tokens, which are unlikely."""

    token_logprobs: List[float]
    p: List[float]
    """``p[j]`` = p(success | the first ``j`` tokens), ``j`` = 0 .. n."""
    pivots: List[int]
    """The planted pivots' positions, ascending."""


def planted_completion(n: int, k: int, seed: int,
                       p_gap: float = DEFAULT_P_GAP) -> PlantedCompletion:
    """``n`` tokens with ``k`` pivots at random positions. An ordinary token's log-prob is
    ``-Exp(mean 0.05)`` (nearly certain), a pivot's is uniform in ``[-4, -2]`` (unlikely, as
    the report expects of tokens that change the outcome). p(success) rises by the same jump
    ``min(1.5 p_gap, 0.9 / k)`` at every pivot, centred in [0, 1], plus uniform noise of
    ``+-P_NOISE`` per prefix: near-monotone, each pivot's jump at least ``p_gap`` and every
    other step far below it. Deterministic in ``(n, k, seed)``."""
    jump = min(1.5 * p_gap, 0.9 / max(k, 1))
    if not 1 <= k <= n or jump < p_gap + 2 * P_NOISE:
        raise ValueError(f"{k} pivots in {n} tokens do not fit: need 1 <= k <= n and "
                         f"k <= {0.9 / (p_gap + 2 * P_NOISE):.1f} at p_gap {p_gap}")
    rng = np.random.default_rng([seed, n, k])
    pivots = np.sort(rng.choice(n, size=k, replace=False))
    logprobs = -rng.exponential(0.05, n)
    logprobs[pivots] = -rng.uniform(2.0, 4.0, k)
    passed = np.searchsorted(pivots, np.arange(n + 1))  # pivots before prefix end j
    p = (1.0 - k * jump) / 2 + jump * passed + rng.uniform(-P_NOISE, P_NOISE, n + 1)
    return PlantedCompletion(logprobs.tolist(), np.clip(p, 0.0, 1.0).tolist(), pivots.tolist())


def token_midpoint(token_logprobs: Sequence[float], start: int, end: int) -> int:
    """Split ``[start, end)`` at its middle token, whatever the log-probs (codelion/pts)."""
    return (start + end) // 2


def search_by_logprob(task: PlantedCompletion, p_gap: float) -> Tuple[List[int], int]:
    """:func:`~megaphi.pts.search.pivotal_tokens` (Figure 4) on ``task``: the pivots it finds
    and the number of distinct prefixes it estimates."""
    seen = set()

    def p_success(prefix: List[int]) -> float:
        seen.add(len(prefix))
        return task.p[len(prefix)]

    ids = list(range(len(task.token_logprobs)))
    found = pivotal_tokens(ids, task.token_logprobs, p_success, p_gap=p_gap)
    return [pivot.index for pivot in found], len(seen)


def search_by_split(task: PlantedCompletion, p_gap: float,
                    split: Callable[[Sequence[float], int, int], int]) -> Tuple[List[int], int]:
    """Figure 4's bisection (:func:`~megaphi.pts.search.subdivide`) with another ``split``:
    the pivots found and the number of distinct prefixes estimated."""
    memo: Dict[int, float] = {}

    def p(j: int) -> float:
        if j not in memo:
            memo[j] = task.p[j]
        return memo[j]

    segments = subdivide(task.token_logprobs, p, p_gap, split=split)
    found = [s for s, e in segments if e - s == 1 and abs(p(e) - p(s)) >= p_gap]
    return found, len(memo)


def compare_splits(lengths: Sequence[int] = PLANTED_LENGTHS,
                   pivot_counts: Sequence[int] = PLANTED_PIVOTS, seeds: int = PLANTED_SEEDS,
                   p_gap: float = DEFAULT_P_GAP) -> dict:
    """Estimates per pivot found by the log-prob split (Figure 4) and the token split, on
    :func:`planted_completion` for every ``(n, k)`` and ``seeds`` seeds.

    Returns:
        ``p_gap``, ``seeds`` and ``settings``: per ``(n, k)`` the pivots planted over all seeds,
        per split (``logprob``, ``token``) the pivots found, how many were planted ones, the
        estimates per seed, their mean and the estimates per pivot found; ``same_pivots``
        (both found the same positions on every seed), ``token_over_logprob`` (the ratio of
        their estimates), ``scan`` (``n + 1``: estimating every prefix) and ``bound``
        (``2 + 2 k log2 n``, the report's cost).
    """
    splits = {"logprob": lambda t: search_by_logprob(t, p_gap),
              "token": lambda t: search_by_split(t, p_gap, token_midpoint)}
    rows = []
    for n in lengths:
        for k in pivot_counts:
            tasks = [planted_completion(n, k, seed, p_gap) for seed in range(seeds)]
            row = {"n": n, "k": k, "planted": k * seeds, "scan": n + 1,
                   "bound": 2 + 2 * k * math.log2(n)}
            found = {}
            for name, search in splits.items():
                results = [search(task) for task in tasks]
                found[name] = [pivots for pivots, _ in results]
                estimates = [count for _, count in results]
                hits = sum(len(set(f) & set(t.pivots)) for f, t in zip(found[name], tasks))
                total = sum(len(f) for f in found[name])
                row[name] = {"found": total, "planted_found": hits, "estimates": estimates,
                             "mean_estimates": statistics.fmean(estimates),
                             "estimates_per_pivot": sum(estimates) / total if total else None}
            row["same_pivots"] = found["logprob"] == found["token"]
            row["token_over_logprob"] = (row["token"]["mean_estimates"]
                                         / row["logprob"]["mean_estimates"])
            rows.append(row)
    return {"p_gap": p_gap, "seeds": seeds, "settings": rows}


__all__ = ["DEFAULT_PROMPT", "HFBackend", "PlantedCompletion", "RolloutPlan", "compare_splits",
           "plain_torch", "plan_rollouts", "planted_completion", "prompt_ids",
           "random_checkpoint", "run_rollouts", "search_by_logprob", "search_by_split",
           "time_arms", "token_midpoint"]
