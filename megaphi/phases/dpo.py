"""``dpo``: Direct Preference Optimization on preference pairs, full-length and single-token.

Data: preference datasets (``tools/preprocess_data.py --format preference``) blended by weight
from the mixture. Pairs are packed several to a row, a pair's chosen and rejected sequences in
the same row (:class:`megaphi.data.preference.PairSegments`), attention kept inside each
sequence as in SFT packing. A Pivotal Token pair is one sequence, its context: the chosen and
rejected log-probs both come from the last position's distribution, gathered from the
vocabulary-parallel logits without the whole vocabulary (:mod:`megaphi.model.vocab_parallel`).

Reference log-probs are computed once, before the first step, by a forward-only pass of the
reference model (``dpo.reference``, by default ``checkpoint.load``) on this run's layout, and
stored in the run directory with a fingerprint (:mod:`megaphi.phases.reference`); every row
carries its pairs' reference values, so no step runs the reference.

The loss of a step is the mean over the pairs of the global batch of the per-pair loss
(:func:`preference_loss`): the loss function returns ``(loss_sum, num_pairs, report)`` and
Megatron's per-token normalisation (here per pair) makes it exact across micro-batches, data-
and pipeline-parallel ranks. Context parallelism is not supported (packed rows are not split
over context-parallel ranks). Metrics use TRL's names and its convention (rewards are
``beta * (policy - reference)`` log-probs): ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracy`` (a tie is not a win), ``rewards/margin``, ``logps/chosen``,
``logps/rejected``; each is a mean over pairs. They use the log-probs the loss uses: with
``dpo.average_logps`` the per-token averages (TRL's ``ipo`` averages in its loss but logs sums).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megaphi.config.schema import ConfigError, DPOConfig
from megaphi.phases.base import Phase, forward_once
from megaphi.phases.lm import packed_forward, packed_shape

logger = logging.getLogger("megaphi.train")

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
           "logps/chosen", "logps/rejected")


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    dpo: DPOConfig):
    """Per-pair DPO losses and metrics from summed response log-probs (all ``[pairs]``).

    With ``dpo.average_logps`` the sums are divided by the response lengths first (policy
    and reference alike). ``z = (pi_c - ref_c) - (pi_r - ref_r)``; ``sigmoid``:
    ``-(1 - eps) log s(beta z) - eps log s(-beta z)`` (eps = ``dpo.label_smoothing``, cDPO);
    ``ipo``: ``(z - 1 / (2 beta))^2``. ``dpo.sft_weight`` adds that weight times the chosen
    response's mean per-token negative log-likelihood.

    Returns:
        ``(losses, metrics)``: ``[pairs]`` losses, and ``[pairs]`` values of each name of
        :data:`METRICS` (detached).
    """
    pi_c, pi_r, ref_c, ref_r = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    if dpo.average_logps:
        pi_c, ref_c = pi_c / chosen_tokens, ref_c / chosen_tokens
        pi_r, ref_r = pi_r / rejected_tokens, ref_r / rejected_tokens
    chosen_ratio, rejected_ratio = pi_c - ref_c, pi_r - ref_r
    z = chosen_ratio - rejected_ratio
    beta = dpo.beta
    if dpo.loss == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = dpo.label_smoothing
        losses = -F.logsigmoid(beta * z) * (1.0 - eps)
        if eps:
            losses = losses - F.logsigmoid(-beta * z) * eps
    if dpo.sft_weight:
        losses = losses - dpo.sft_weight * policy_chosen / chosen_tokens
    chosen_reward = beta * chosen_ratio.detach()
    rejected_reward = beta * rejected_ratio.detach()
    metrics = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
               "rewards/accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
               "rewards/margin": chosen_reward - rejected_reward,
               "logps/chosen": pi_c.detach(), "logps/rejected": pi_r.detach()}
    return losses, metrics


def pair_logps(batch: Dict[str, torch.Tensor], logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The summed log-probs of every pair of a micro-batch of DPO rows, from the logits.

    Returns ``[pairs]`` tensors (pairs in row-slot order, fp64): ``pair_index``, ``chosen``
    and ``rejected`` (differentiable), ``chosen_tokens``, ``rejected_tokens``, ``ref_chosen``,
    ``ref_rejected``."""
    from megaphi.model.vocab_parallel import vocab_parallel_logprobs

    b, s = batch["tokens"].shape
    logits = logits.reshape(b, s, -1)  # [1, b*s, v] in THD format
    scored = (batch["chosen_pair"] >= 0) | (batch["rejected_pair"] >= 0)
    targets = torch.stack([batch["labels"], batch["rejected_labels"]], dim=-1)
    logps = torch.zeros(b, s, 2, dtype=torch.float64, device=logits.device)
    # Only the scored positions' distributions (responses, a token pair's last position).
    logps = logps.masked_scatter(scored[..., None].expand(b, s, 2), vocab_parallel_logprobs(
        logits[scored], targets[scored]).double())

    def per_slot(values, slots):  # sum of values over the positions of each row slot
        mask = slots >= 0
        return torch.zeros(b, s, dtype=torch.float64, device=logits.device).scatter_add(
            1, slots.clamp(min=0), torch.where(mask, values, torch.zeros_like(values)))

    ones = torch.ones(b, s, dtype=torch.float64, device=logits.device)
    used = batch["pair_index"] >= 0  # [b, s] row slots holding a pair
    out = {"chosen": per_slot(logps[..., 0], batch["chosen_pair"]),
           "rejected": per_slot(logps[..., 1], batch["rejected_pair"]),
           "chosen_tokens": per_slot(ones, batch["chosen_pair"]),
           "rejected_tokens": per_slot(ones, batch["rejected_pair"]),
           "pair_index": batch["pair_index"],
           "ref_chosen": batch["ref_chosen"].double(), "ref_rejected": batch["ref_rejected"].double()}
    return {k: v[used] for k, v in out.items()}


def dpo_loss(dpo: DPOConfig, batch: Dict[str, torch.Tensor], output: torch.Tensor):
    """Megatron loss function of a DPO micro-batch: ``(loss_sum, num_pairs, report)``, with
    ``report`` the ``[sum, count]`` over pairs of the loss and each of :data:`METRICS`."""
    p = pair_logps(batch, output)
    losses, metrics = preference_loss(p["chosen"], p["rejected"], p["ref_chosen"],
                                      p["ref_rejected"], p["chosen_tokens"],
                                      p["rejected_tokens"], dpo)
    pairs = torch.tensor(float(len(losses)), dtype=torch.float64, device=losses.device)
    loss_sum = losses.sum()
    if not len(losses):  # a micro-batch of padding rows: still a graph to run backward on
        loss_sum = loss_sum + 0.0 * output.sum()
    report = {"loss": torch.stack([loss_sum.detach(), pairs])}
    for name, values in metrics.items():
        report[name] = torch.stack([values.sum(), pairs])
    return loss_sum.float(), pairs.to(torch.int), report


def logps_loss(batch: Dict[str, torch.Tensor], output: torch.Tensor):
    """Loss function of a forward-only pass collecting each pair's log-probs: the report is
    ``{"pairs": [pairs, 3]}`` rows of ``(pair_index, chosen, rejected)``."""
    p = pair_logps(batch, output)
    rows = torch.stack([p["pair_index"].double(), p["chosen"].detach(),
                        p["rejected"].detach()], dim=1)
    zero = torch.zeros((), device=output.device)  # forward only: nothing to differentiate
    return zero, torch.tensor(max(len(rows), 1), dtype=torch.int, device=output.device), \
        {"pairs": rows}


def dpo_forward_step(loss_func, data_iterator, model):
    """Megatron ``forward_step_func`` of DPO rows: the logits of the packed rows, then
    ``loss_func(batch, logits)``."""
    batch = next(data_iterator)
    return packed_forward(model, batch), partial(loss_func, batch)


def pair_rows(cfg, segments, pad_id: int, num_samples: Optional[int] = None):
    """A dataset's DPO rows: its pairs packed once with ``train.seed`` (every epoch reuses
    that packing, in another row order), one epoch when ``num_samples`` is None. Training
    and the reference pass see each pair in the same row, so with the policy equal to the
    reference the log-probs agree exactly (step 0: loss ln 2, every reward margin 0)."""
    from megaphi.data.packing import PackedRows

    return PackedRows(segments, cfg.model.seq_length, seed=cfg.train.seed,
                      num_samples=num_samples, packing=cfg.data.packing, pad_id=pad_id,
                      repack=False)


def collect_logps(cfg, rt, chunks, prefixes: Sequence[str], tokenizer,
                  what: str) -> Dict[str, tuple]:
    """Every pair's summed log-probs under the model in ``chunks``, one forward-only pass over
    each dataset on this run's layout; ``{prefix: (chosen, rejected)}`` float64 arrays known on
    every rank, NaN for pairs longer than a row."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaphi.data.preference import PairSegments

    seq = cfg.model.seq_length
    shape = packed_shape(cfg, chunks)
    step = partial(dpo_forward_step, logps_loss)
    for chunk in chunks:
        chunk.eval()
    segments, first = [], 0
    for prefix in prefixes:
        segments.append(PairSegments(prefix, seq, first_pair=first))
        first += len(segments[-1].pairs)
    values = torch.zeros(2, first, dtype=torch.float64)
    done = torch.zeros(first, dtype=torch.float64)
    for seg in segments:
        rows = pair_rows(cfg, seg, tokenizer.pad_id)
        logger.info("%s: %s", what, rows.describe())
        reports = forward_once(cfg, rt, chunks, rows, step, shape, what=what)
        if reports and ps.get_tensor_model_parallel_rank() == 0:
            got = torch.cat([r["pairs"].cpu() for r in reports])
            index = got[:, 0].long()
            values[:, index] = got[:, 1:].t()
            done[index] = 1.0
    for chunk in chunks:
        chunk.train()
    both = torch.cat([values, done[None]]).to(rt.device)
    dist.all_reduce(both)  # each pair was computed by one data-parallel rank's last stage
    both = both.cpu().numpy()
    values = np.where(both[2] > 0, both[:2], np.nan)
    out, at = {}, 0
    for prefix, seg in zip(prefixes, segments):
        n = len(seg.pairs)
        out[prefix] = (values[0, at:at + n], values[1, at:at + n])
        at += n
    return out


class DPOPhase(Phase):
    """``dpo``: the policy starts from ``checkpoint.load``; the reference log-probs come from
    ``dpo.reference`` (default: the same checkpoint), precomputed."""

    name = "dpo"
    dataset_kind = "preference"
    report_keys = ("loss", *METRICS)
    count_name = "pairs"
    batch_keys = ("tokens", "labels", "rejected_labels", "position_ids", "seq_ids",
                  "chosen_pair", "rejected_pair", "pair_index", "ref_chosen", "ref_rejected")

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.parallel.cp > 1:
            raise ConfigError("parallel.cp", f"DPO rows are packed, and packed rows are not "
                              f"split over context-parallel ranks yet (cp={cfg.parallel.cp})",
                              "set parallel.cp=1 (use train.recompute=full for long pairs)")
        if cfg.data.overlong != "drop":
            raise ConfigError("data.overlong", "DPO pairs are never truncated (a cut response "
                              "changes its preference): pairs longer than a row are dropped "
                              "and counted", "set data.overlong=drop, or raise "
                              "model.seq_length")
        self.reference: Optional[Path] = None
        self.fingerprint: Optional[dict] = None
        self.logps: Optional[Dict[str, tuple]] = None

    # -- data and reference --------------------------------------------------------------
    def check_data(self, mixture) -> None:
        """The datasets are preference pairs, the reference checkpoint exists and fits the
        model, and any stored reference log-probs match data and reference (before any
        process group is set up)."""
        from megaphi.phases import reference as ref
        from megaphi.training.warm_start import check_architecture, checkpoint_config, \
            resolve_start

        super().check_data(mixture)
        cfg = self.cfg
        field = "dpo.reference" if cfg.dpo.reference else "checkpoint.load"
        self.reference = resolve_start(cfg.dpo.reference or cfg.checkpoint.load, field)
        check_architecture(checkpoint_config(self.reference), cfg, self.reference)
        self.fingerprint = ref.fingerprint(mixture.all_prefixes(), self.reference,
                                           cfg.model.seq_length)
        self.logps = ref.load_cached(cfg.train.run_dir, self.fingerprint)

    def prepare(self, rt, chunks, layout: dict) -> None:
        """Load the stored reference log-probs, or compute them with the reference weights in
        ``chunks`` (which the caller then loads the policy into) and store them."""
        from megaphi.data.tokenizer import load_tokenizer
        from megaphi.phases import reference as ref
        from megaphi.training.checkpoint import load_checkpoint

        run_dir = self.cfg.train.run_dir
        if self.logps is not None:
            logger.info("reference log-probs of %d pairs (%d fit a row): reused from %s (not "
                        "recomputed)", sum(len(c) for c, _ in self.logps.values()),
                        sum(int((~np.isnan(c)).sum()) for c, _ in self.logps.values()),
                        ref.cache_path(run_dir))
            return
        logger.info("computing the reference log-probs of every pair with %s (one forward-"
                    "only pass)", self.reference)
        load_checkpoint(self.reference, chunks, None, None, layout, load_optimizer=False,
                        load_progress=False)
        self.logps = collect_logps(self.cfg, rt, chunks, list(self.fingerprint["datasets"]),
                                   load_tokenizer(self.cfg.data.tokenizer),
                                   what="reference log-probs")
        if rt.is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            path = ref.save(run_dir, self.fingerprint, self.logps)
            logger.info("stored the reference log-probs in %s", path)

    def build_datasets(self, tokenizer, mixture, samples, cache_dir):
        from megaphi.data.datasets import check_datasets_tokenizer
        from megaphi.data.packing import build_packed_rows
        from megaphi.data.preference import PairSegments

        cfg = self.cfg
        check_datasets_tokenizer(mixture.all_prefixes(), tokenizer, cfg.model.vocab_size)
        seq = cfg.model.seq_length

        def rows_of(i, prefix, n):
            return pair_rows(cfg, PairSegments(prefix, seq, reference=self.logps[prefix]),
                             tokenizer.pad_id, num_samples=n)

        out = []
        for split, n in zip(("train", "valid"), samples):
            blend = mixture.blend(split)
            out.append(None if not n or blend is None else build_packed_rows(blend, rows_of, n))
        return out

    # -- the step ------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        return dpo_forward_step(partial(dpo_loss, self.cfg.dpo), data_iterator, model)

    def pipeline_shape(self, chunks):
        return packed_shape(self.cfg, chunks)



def dpo_metrics(policy: Dict[str, tuple], reference: Dict[str, tuple],
                lengths: Dict[str, tuple], dpo: DPOConfig) -> dict:
    """The DPO loss and metrics over every pair of some datasets from their stored log-probs
    (``{prefix: (chosen, rejected)}`` each, and the response lengths): the evaluation's
    numbers. Pairs with NaN (too long for a row) are left out."""
    def cat(values, k):
        return torch.from_numpy(np.concatenate([values[p][k] for p in policy]))

    keep = ~torch.isnan(cat(policy, 0))
    parts = [cat(v, k)[keep] for v in (policy, reference) for k in (0, 1)]
    losses, metrics = preference_loss(*parts, cat(lengths, 0)[keep].double(),
                                      cat(lengths, 1)[keep].double(), dpo)
    n = len(losses)
    out = {"loss": float(losses.mean()) if n else float("nan"), "pairs": n,
           "dropped": int((~keep).sum())}
    for name, values in metrics.items():
        out[name] = float(values.mean()) if n else float("nan")
    out["accuracy"] = out["rewards/accuracy"]
    out["margin"] = out["rewards/margin"]
    return out


def response_lengths(prefixes: List[str]) -> Dict[str, tuple]:
    """Scored tokens of each pair's chosen and rejected response (1 and 1 for token pairs)."""
    from megaphi.data.preference import TOKEN, PreferencePairs

    out = {}
    for prefix in prefixes:
        pairs = PreferencePairs(prefix)
        token = pairs.kinds == TOKEN
        out[prefix] = (np.where(token, 1, pairs.chosen_lengths),
                       np.where(token, 1, pairs.rejected_lengths))
    return out
