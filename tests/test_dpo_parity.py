"""DPO parity with transformers and TRL (CPU, fp32).

The policy and the reference are two different tiny random ``Phi3ForCausalLM`` (Phi-4's
vocabulary), imported as megaphi checkpoints; the data are 3 full-length pairs and 3 token
pairs written here and preprocessed with the real pipeline (Phi-4 tokenizer, chat template).

- transformers alone: each pair's log-probs (the summed log-probs of a full pair's response
  tokens, the two next-token log-probs at a token pair's last context position) from the
  Hugging Face models, and the DPO (sigmoid), cDPO and IPO losses, rewards and margins from the
  papers' formulas written out here, against megaphi-eval's JSON; the gradients of the mean
  sigmoid loss by transformers' autograd against one training step of the real DPO phase
  (``tests/workers/dpo_parity_worker.py``). Relative tolerance 1e-5 throughout.
- TRL: a real ``trl.DPOTrainer`` (the version the ``test`` extra pins) tokenizes the full pairs
  itself (its ids must be megaphi's) and evaluates every pair with its own evaluation loop,
  collator, fused log-prob head and loss; its loss must be megaphi-eval's for ``sigmoid``,
  ``ipo`` and label smoothing (cDPO).
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distributed import ROOT, WORKERS, torchrun, worker_env
from hf_models import build_hf_model, load_hf

BETA, EPS = 0.1, 0.1  # DPO beta, cDPO label smoothing
REL = 1e-5
SEQ = 128
NUM_LAYERS = 2

FULL_PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}],
     "chosen": "4.", "rejected": "It is 5, I think."},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue"}],  # TRL's conversational form
     "rejected": [{"role": "assistant", "content": "Tuesday, obviously"}]},
    {"prompt": [{"role": "user", "content": "Say hi"}],
     "chosen": "Hello there!", "rejected": "No."},
]

# megaphi-eval runs: name -> (tensor-parallel size, dpo.* overrides); cDPO at TP=2 also checks
# the vocabulary-parallel log-probs. LOSSES: the same losses for paper_losses().
EVALS = {"sigmoid": (1, []),
         "cdpo": (2, [f"dpo.label_smoothing={EPS}"]),
         "ipo": (1, ["dpo.loss=ipo", "dpo.average_logps=true"])}
LOSSES = {"sigmoid": {}, "cdpo": {"eps": EPS}, "ipo": {"loss": "ipo", "average": True}}


def token_pairs(tokenizer):
    """Pivotal-token pairs: the context ends after ``prefix_ids``; chosen/rejected are ids."""
    one = tokenizer.encode
    return [
        {"prompt": [{"role": "user", "content": "Count to three"}],
         "prefix_ids": one("1, 2,"), "chosen_token_id": one("3")[0],
         "rejected_token_id": one("4")[0]},
        {"prompt": [{"role": "user", "content": "Capital of France?"}], "prefix_ids": [],
         "chosen_token_id": one("Paris")[0], "rejected_token_id": one("London")[0]},
        {"prompt": [{"role": "user", "content": "Pick"}], "prefix_ids": one("Hello,"),
         "chosen_token_id": 1234, "rejected_token_id": 4321},
    ]


class Launch:
    """``python ARGS`` (one process, rendezvous on a free port) or ``torchrun`` with ``nproc``
    processes, started now to run concurrently with the rest of the module; output to files."""

    def __init__(self, nproc: int, args, log: Path):
        from megaphi.platform import free_port

        self.cmd = torchrun(nproc, *args) if nproc > 1 else [sys.executable, *map(str, args)]
        self.log = log
        self.proc = subprocess.Popen(self.cmd, stdout=open(log.with_suffix(".out"), "w"),
                                     stderr=open(log.with_suffix(".err"), "w"),
                                     env=worker_env(MASTER_PORT=str(free_port())), cwd=ROOT)

    def wait(self) -> str:
        try:
            code = self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        out = self.log.with_suffix(".out").read_text()
        assert code == 0, (f"{' '.join(map(str, self.cmd))} failed ({code}):\n{out[-2000:]}\n"
                           f"{self.log.with_suffix('.err').read_text()[-5000:]}")
        return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Models, checkpoints and pairs; then megaphi-eval for each loss and the training-step
    worker are started, to run while the module computes the transformers references."""
    from megaphi.data.preference import PreferencePairs
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer
    from megaphi.hf.convert import import_hf_checkpoint

    tmp = tmp_path_factory.mktemp("dpo_parity")
    hf = {name: build_hf_model(tmp / f"hf_{name}", num_layers=NUM_LAYERS, seed=seed)
          for name, seed in (("policy", 0), ("reference", 1))}
    ckpt = {name: import_hf_checkpoint(str(path), str(tmp / name)) for name, path in hf.items()}
    tokenizer = Phi4Tokenizer()
    lines = FULL_PAIRS + token_pairs(tokenizer)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    prefix = str(tmp / "pairs")
    preprocess([str(tmp / "pairs.jsonl")], prefix, tokenizer, workers=1, format="preference")
    pairs = PreferencePairs(prefix)
    assert list(pairs.kinds) == [0, 0, 0, 1, 1, 1]  # 3 full pairs, then 3 token pairs

    launches = {}
    for name, (tp, overrides) in EVALS.items():
        launches[name] = Launch(tp, [
            "-m", "megaphi.eval", "--ckpt", ckpt["policy"], "--reference", ckpt["reference"],
            "--data", prefix, "--beta", BETA, "--json", f"model.seq_length={SEQ}",
            f"parallel.tp={tp}", *overrides], tmp / f"eval_{name}")
    launches["step"] = Launch(1, [
        WORKERS / "dpo_parity_worker.py", tmp / "step.pt", ckpt["policy"], ckpt["reference"],
        prefix, tmp / "run", "--tp", 1, "--beta", BETA], tmp / "step")
    yield SimpleNamespace(tmp=tmp, hf=hf, ckpt=ckpt, prefix=prefix, pairs=pairs,
                          launches=launches)
    for launch in launches.values():  # a failed test must not leave launches running
        if launch.proc.poll() is None:
            launch.proc.kill()
            launch.proc.wait()


def sequences(pairs):
    """Per pair, ``[(ids, first scored target position)]`` for chosen and rejected: a full
    pair's prompt + response scored on the response tokens; a token pair's context + the token,
    scored on that token alone (the last context position's distribution)."""
    from megaphi.data.preference import FullPair

    out = []
    for i in range(len(pairs)):
        pair = pairs[i]
        if isinstance(pair, FullPair):
            prompt = [int(t) for t in pair.prompt]
            out.append([(prompt + [int(t) for t in r], len(prompt) - 1)
                        for r in (pair.chosen, pair.rejected)])
        else:
            context = [int(t) for t in pair.context]
            out.append([(context + [t], len(context) - 1)
                        for t in (pair.chosen_id, pair.rejected_id)])
    return out


def hf_logps(model, seqs) -> torch.Tensor:
    """``[pairs, 2]`` (chosen, rejected) summed log-probs of the scored tokens, by transformers:
    log_softmax of the fp32 logits, gathered at the next tokens (differentiable)."""
    rows = []
    for pair in seqs:
        sides = []
        for ids, first in pair:
            ids = torch.tensor(ids)[None]
            logps = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            token = logps.gather(-1, ids[0, 1:, None])[:, 0]
            sides.append(token[first:].double().sum())
        rows.append(torch.stack(sides))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def hf(data):
    """transformers' log-probs of every pair under the policy and the reference, and the
    scored tokens per response."""
    seqs = sequences(data.pairs)
    with torch.no_grad():
        logps = {name: hf_logps(load_hf(path), seqs) for name, path in data.hf.items()}
    lengths = torch.tensor([[len(ids) - 1 - first for ids, first in pair] for pair in seqs],
                           dtype=torch.float64)
    return SimpleNamespace(seqs=seqs, lengths=lengths, **logps)


def paper_losses(pi, ref, lengths, loss="sigmoid", eps=0.0, average=False):
    """Per-pair values of the loss and of each metric TRL logs (megaphi-eval's JSON has their
    means), from ``[pairs, 2]`` log-probs: DPO ``-log s(beta z)``; cDPO
    ``-(1 - eps) log s(beta z) - eps log s(-beta z)``; IPO ``(z - 1 / (2 beta))^2`` with
    per-token averaged log-probs; ``z = (pi_c - ref_c) - (pi_r - ref_r)``; rewards
    ``beta (pi - ref)``."""
    if average:
        pi, ref = pi / lengths, ref / lengths
    ratio = pi - ref
    z = ratio[:, 0] - ratio[:, 1]
    if loss == "ipo":
        losses = (z - 1.0 / (2.0 * BETA)) ** 2
    else:
        losses = -(1.0 - eps) * F.logsigmoid(BETA * z) - eps * F.logsigmoid(-BETA * z)
    rewards = BETA * ratio
    return {"loss": losses, "rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
            "rewards/margin": rewards[:, 0] - rewards[:, 1], "logps/chosen": pi[:, 0],
            "logps/rejected": pi[:, 1],
            "accuracy": (rewards[:, 0] > rewards[:, 1]).double()}


def rel_diff(got, want) -> float:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want,
                                                                           dtype=torch.float64)
    return ((got - want).norm() / want.norm()).item()


def assert_rel(got, want, what: str) -> None:
    diff = rel_diff(got, want)
    assert diff <= REL, f"{what}: {got} vs {want} (relative difference {diff:.2e})"


def assert_mean(got: float, values: torch.Tensor, what: str, want=None) -> None:
    """``got`` is the mean of the per-pair ``values`` (or ``want``) within 1e-5 of the values'
    mean magnitude: that is |mean| for the losses and log-probs (one sign), while a mean of
    signed rewards cancels, and its own relative error would measure the cancellation (fp32
    rounding of log-probs summing to -40, amplified) rather than the agreement."""
    want = values.mean().item() if want is None else want
    diff = abs(got - want) / values.abs().mean().item()
    assert diff <= REL, f"{what}: {got} vs {want} (difference {diff:.2e} of the mean |value|)"


@pytest.fixture(scope="module")
def evals(data):
    return {name: json.loads(data.launches[name].wait().strip().splitlines()[-1])
            for name in EVALS}


@pytest.fixture(scope="module")
def step(data):
    data.launches["step"].wait()
    return torch.load(data.tmp / "step.pt", weights_only=False)


# ---------------------------------------------------------------------------------------------
# transformers alone


def test_pair_logps_match_transformers(hf, step):
    """Every pair's summed response log-probs (full pairs) and next-token log-probs (token
    pairs), policy and reference, as the DPO phase computes them (collect_logps, the reference
    pass of DPOPhase.prepare), each within 1e-5 of transformers'."""
    import numpy as np

    for name, want in (("policy", hf.policy), ("reference", hf.reference)):
        got = torch.from_numpy(np.stack(step[name], axis=1))
        assert got.shape == want.shape == (6, 2)
        for i in range(6):
            for side, label in enumerate(("chosen", "rejected")):
                assert_rel(got[i, side], want[i, side], f"{name} pair {i} {label}")
    assert not torch.allclose(hf.policy, hf.reference, rtol=1e-2)  # two different models
    assert hf.lengths[3:].eq(1).all() and hf.lengths[:3].gt(1).all()


@pytest.mark.parametrize("name", list(EVALS))
def test_eval_loss_and_rewards_match_the_formulas(name, evals, hf):
    """megaphi-eval's DPO / cDPO / IPO loss, rewards, margin, log-probs and accuracy over the 6
    pairs, against the formulas on transformers' log-probs."""
    got = evals[name]
    want = paper_losses(hf.policy, hf.reference, hf.lengths, **LOSSES[name])
    assert got["pairs"] == 6 and got["dropped"] == 0
    assert got["layout"]["tp"] == EVALS[name][0]
    assert got["loss_type"] == ("ipo" if name == "ipo" else "sigmoid")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen",
                "logps/rejected"):
        assert_mean(got[key], want[key], f"{name} {key}")
    assert got["margin"] == got["rewards/margin"]
    assert got["accuracy"] == got["rewards/accuracy"] == want["accuracy"].mean().item()
    assert 0.0 < got["accuracy"] < 1.0  # some pairs won, some lost
    assert abs(got["loss"] - (math.log(2) if name != "ipo" else 25.0)) > 1e-3  # not a tie


def test_training_step_gradients_match_transformers(data, hf, step):
    """The policy's gradients of the mean sigmoid DPO loss over the 6 pairs after one training
    step's schedule of the DPO phase (TP=1, a micro-batch per packed row), against
    transformers' autograd of the same loss, every tensor by Hugging Face name; and the step's
    reduced metrics against the formulas."""
    model = load_hf(data.hf["policy"])
    want = paper_losses(hf_logps(model, hf.seqs), hf.reference, hf.lengths)
    want["loss"].mean().backward()
    metrics = step["metrics"]
    assert metrics["pairs"] == 6 and step["rows"] >= 2  # several micro-batches accumulate
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen",
                "logps/rejected"):  # the step's logged metrics
        assert_mean(metrics[key], want[key].detach(), f"step {key}")
    assert metrics["rewards/accuracy"] == want["accuracy"].mean().item()
    grads = step["grads"]
    assert set(grads) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.norm() > 0, name
        assert grads[name].shape == param.grad.shape, name
        diff = rel_diff(grads[name], param.grad)
        assert diff <= REL, f"{name}: |megaphi - transformers| / |transformers| = {diff:.2e}"


# ---------------------------------------------------------------------------------------------
# TRL
#
# TRL 1.16 has no standalone DPO loss function: the loss lives in DPOTrainer._compute_loss. A
# real DPOTrainer is built with the two Hugging Face models and the Phi-4 tokenizer (the one
# megaphi exports), and `evaluate()` runs its own evaluation loop over every pair, one pair per
# batch: its collator ([chosen rows; rejected rows], completion_mask), its fused log-prob head,
# its reference forward and its loss. The full pairs are tokenized by TRL from the
# conversational records (and must give megaphi's ids). A token pair is given to TRL as a
# one-token completion (prompt_ids = the context, chosen_ids / rejected_ids = the token): TRL
# appends no EOS to pre-tokenized completions, so it scores exactly that token's log-prob at the
# last context position.
#
# TRL 1.16's `sigmoid` loss ignores label_smoothing (its `robust` loss is another estimator);
# cDPO's formula is its `aot` loss, `-(1-eps) log s(beta d) - eps log s(-beta d)` with `d` the
# sorted policy log-ratios minus the sorted reference log-ratios over the batch: with one pair
# per batch the sorts are the identity and `d` is DPO's `z`, so it is exactly cDPO per pair.
# TRL's `ipo` averages the log-ratios over the completion tokens (megaphi: dpo.average_logps).

TRL = {"sigmoid": {"loss_type": ["sigmoid"]},
       "cdpo": {"loss_type": ["aot"], "label_smoothing": EPS},
       "ipo": {"loss_type": ["ipo"]}}


@pytest.fixture(scope="module")
def hf_tokenizer(data):
    pytest.importorskip("trl", minversion="1.16", reason="TRL is pinned in setup.py's test "
                        "extra: pip install -e .[test]")
    from transformers import AutoTokenizer

    from megaphi.hf.tokenizer import write_phi4_tokenizer

    path = data.tmp / "tokenizer"
    path.mkdir()
    write_phi4_tokenizer(path, model_max_length=SEQ)
    return AutoTokenizer.from_pretrained(path)


def trl_evaluate(data, tokenizer, name):
    """TRL's evaluation of every pair (one per batch) with the loss of ``TRL[name]``."""
    from datasets import Dataset, concatenate_datasets
    from trl import DPOConfig, DPOTrainer

    def conversational(response):
        return response if isinstance(response, list) else [{"role": "assistant",
                                                              "content": response}]

    full = Dataset.from_list([{"prompt": p["prompt"], "chosen": conversational(p["chosen"]),
                               "rejected": conversational(p["rejected"])} for p in FULL_PAIRS])
    args = DPOConfig(output_dir=str(data.tmp / f"trl_{name}"), beta=BETA, **TRL[name],
                     per_device_eval_batch_size=1, bf16=False, fp16=False, use_cpu=True,
                     max_length=None, report_to="none", save_strategy="no",
                     logging_strategy="no", dataloader_num_workers=0)
    trainer = DPOTrainer(model=load_hf(data.hf["policy"]),
                         ref_model=load_hf(data.hf["reference"]), args=args,
                         train_dataset=full, eval_dataset=full, processing_class=tokenizer)
    ids = ["prompt_ids", "chosen_ids", "rejected_ids"]
    tokenized = trainer.eval_dataset.select_columns(ids)
    for i, row in enumerate(tokenized):  # TRL's tokenization is megaphi's
        pair = data.pairs[i]
        assert row["prompt_ids"] == pair.prompt.tolist(), i
        assert (row["chosen_ids"], row["rejected_ids"]) == (pair.chosen.tolist(),
                                                             pair.rejected.tolist()), i
    tokens = Dataset.from_list([
        {"prompt_ids": data.pairs[i].context.tolist(), "chosen_ids": [data.pairs[i].chosen_id],
         "rejected_ids": [data.pairs[i].rejected_id]} for i in range(3, 6)])
    trainer.eval_dataset = concatenate_datasets([tokenized, tokens])  # already in TRL's form
    assert len(trainer.get_eval_dataloader()) == 6  # a batch per pair
    return trainer.evaluate()


@pytest.mark.parametrize("name", list(TRL))
def test_loss_matches_trl(name, data, hf, hf_tokenizer, evals):
    """TRL's DPO (sigmoid), cDPO (label smoothing) and IPO losses over the 6 pairs are
    megaphi-eval's; with the sums TRL's rewards, margins, log-probs and accuracy are too."""
    got = trl_evaluate(data, hf_tokenizer, name)
    ours = evals[name]
    scale = paper_losses(hf.policy, hf.reference, hf.lengths, **LOSSES[name])
    assert_mean(ours["loss"], scale["loss"], f"{name} loss vs TRL", want=got["eval_loss"])
    if name == "ipo":
        return  # TRL logs summed log-probs and rewards; megaphi's are per-token averaged here
    for key, theirs in (("rewards/chosen", "rewards/chosen"),
                        ("rewards/rejected", "rewards/rejected"),
                        ("rewards/margin", "rewards/margins"), ("logps/chosen", "logps/chosen"),
                        ("logps/rejected", "logps/rejected")):
        assert_mean(ours[key], scale[key], f"{name} {key} vs TRL", want=got[f"eval_{theirs}"])
    assert ours["accuracy"] == pytest.approx(got["eval_rewards/accuracies"], abs=1e-6)
