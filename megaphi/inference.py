"""Inference from a megaphi checkpoint in one process: logits, and generation with a KV cache.

    from megaphi.inference import InferenceModel

    with InferenceModel.from_checkpoint("runs/sft/checkpoints") as model:
        logits = model.logits([100264, 882, 100266])               # [3, vocab], fp32
        (out,) = model.generate(prompt_ids, max_new_tokens=64, temperature=0.7, top_p=0.95,
                                stop_ids=[100265], seed=0)
        out.token_ids, out.logprobs, out.finish_reason

A checkpoint saved at any TP / PP layout (by training or by ``tools/convert_checkpoint.py
import``) is loaded into the whole model (TP=1, PP=1) in this process, on the GPU when there is
one, else on the CPU. Megatron-Core needs ``torch.distributed`` and its parallel state even for one
process: without a process group, a private one-process gloo group is created (and destroyed by
:meth:`InferenceModel.close`); inside a job whose Megatron state is already TP=1 / PP=1 (e.g. one
sampler per data-parallel rank) that state is reused, and every rank must load (the read is
collective). The model is built without Megatron's random initialisation (on the meta device,
then given empty storage) and the checkpoint is read straight into its parameters, so loading
holds one copy of the weights plus the largest tensor in transit.

KV cache. Generation uses Megatron-Core's own ``StaticInferenceContext`` through
``GPTModel.forward(inference_context=...)``: the prompt is run once (prefill), each attention layer
stores its keys and values in buffers of ``[prompt + max_new_tokens, batch, kv_heads, head_dim]``,
and every later step feeds only the newest token. It works on the CPU with the local layer spec
(keys are cached before RoPE; Megatron rotates the cached keys with the positions of the whole
window). ``num_samples`` completions of one prompt run as one batch on one cache.

Sampling. ``temperature == 0`` is greedy (argmax, ties to the lowest id, as transformers). Otherwise
the logits are divided by the temperature, top-p keeps the smallest set of most likely tokens whose
probability reaches ``top_p`` (always at least one), and a token is drawn with a generator seeded
from ``seed``. The log-probabilities returned are those of the model itself (temperature 1, no
top-p), which is what Pivotal Token Search needs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from megaphi.config.schema import MegaphiConfig
from megaphi.data.chat import chat_text
from megaphi.training.checkpoint import META, CheckpointNotFound, read_meta, resolve_checkpoint

logger = logging.getLogger(__name__)


def checkpoint_config(iter_dir: Path) -> MegaphiConfig:
    """The config a checkpoint was saved with (validated again)."""
    from megaphi.config.loader import from_dict

    raw = read_meta(iter_dir).get("config")
    if not isinstance(raw, dict):
        raise CheckpointNotFound(f"{Path(iter_dir) / META} has no 'config'; it was not written by "
                                 "megaphi (re-save or re-import the checkpoint)")
    return from_dict(MegaphiConfig, raw)


def single_process_config(cfg: MegaphiConfig, dtype: Optional[str] = None) -> MegaphiConfig:
    """``cfg`` with the whole model in one process (TP=1, PP=1, no SP/CP) and optionally
    another ``precision.dtype`` (``"fp32"`` or ``"bf16"``)."""
    parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=None, cp=1,
                                   sequence_parallel=False)
    precision = cfg.precision
    if dtype not in (None, "fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if dtype is not None:
        precision = dataclasses.replace(precision, dtype=dtype, fp8=dataclasses.replace(
            precision.fp8, recipe=None))
    return dataclasses.replace(cfg, parallel=parallel, precision=precision)


# --------------------------------------------------------------------------------------------
# The runtime and the model
# --------------------------------------------------------------------------------------------


class SingleProcessRuntime:
    """Reference-counted Megatron runtime for holding whole models (TP=1, PP=1) in a process.

    The first :meth:`acquire` creates a private one-process gloo group and Megatron's parallel
    state, unless the process already belongs to a job whose state is TP=1 / PP=1 (then that is
    used, and loading a checkpoint is collective: every rank of the job must load it); the last
    :meth:`release` destroys what the first created.
    """

    users = 0
    owned = False

    @classmethod
    def acquire(cls, seed: int = 1234) -> None:
        """Take a reference, creating the runtime if needed.

        Args:
            seed: seed of Megatron's model-parallel RNG when the runtime is created.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from megaphi.platform import install_cpu_compat

        if not torch.cuda.is_available():
            install_cpu_compat()
        if cls.users == 0 and not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            ps.initialize_model_parallel()
            tensor_parallel.model_parallel_cuda_manual_seed(seed=seed)
            cls.owned = True
        elif cls.users == 0:
            if not ps.model_parallel_is_initialized():
                raise RuntimeError("torch.distributed is initialised but Megatron's parallel state "
                                   "is not; call megaphi.platform.init_runtime (tp=1, pp=1) first")
            if ps.get_tensor_model_parallel_world_size() != 1 or \
                    ps.get_pipeline_model_parallel_world_size() != 1:
                raise RuntimeError("InferenceModel holds the whole model in one process; this "
                                   "process belongs to a TP/PP > 1 layout")
        cls.users += 1

    @classmethod
    def release(cls) -> None:
        """Drop a reference; the last one destroys a runtime :meth:`acquire` created."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        cls.users = max(0, cls.users - 1)
        if cls.users == 0 and cls.owned:
            ps.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
            cls.owned = False


def build_empty_model(cfg: MegaphiConfig, device: torch.device) -> List[torch.nn.Module]:
    """This rank's model chunks (local layer spec) with *uninitialised* parameters on ``device``,
    for code that overwrites every parameter (checkpoint loading, Hugging Face import).

    The model is built on the meta device, where Megatron-Core's random initialisation costs
    neither time nor memory (on the CPU it would draw every weight in fp32 and transiently hold
    a full fp32 copy of the largest one), and each parameter then gets empty storage on
    ``device``, keeping its tensor-parallel attributes (``partition_dim``, ...). Parallel state
    must be initialised.
    """
    from megaphi.model.builder import build_model

    chunks = build_model(cfg, use_te=False, device=torch.device("meta"))
    done = {}
    for chunk in chunks:
        for module in chunk.modules():
            for key, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in done:  # a parameter shared by two modules stays shared
                    real = torch.nn.Parameter(torch.empty_like(param, device=device),
                                              requires_grad=param.requires_grad)
                    real.__dict__.update(param.__dict__)
                    done[id(param)] = real
                module._parameters[key] = done[id(param)]
            stray = [k for k, v in vars(module).items()
                     if isinstance(v, torch.Tensor) and v.is_meta]
            if stray or any(b.is_meta for b in module.buffers(recurse=False)):
                raise RuntimeError(f"{type(module).__name__} keeps meta tensors {stray} outside "
                                   "its parameters; build it with build_model instead")
    return chunks


def load_weights_in_place(iter_dir: Path, chunks: List[torch.nn.Module]) -> None:
    """Load the model weights of a checkpoint (saved at any layout) into this rank's chunks,
    reading every tensor straight into its parameter.

    The same keys as :func:`megaphi.training.checkpoint.load_checkpoint` with
    ``load_optimizer=False`` reads, without its transient copy: Megatron's SwiGLU factory loads
    ``linear_fc1`` as two halves and concatenates them into a new tensor before
    ``load_state_dict`` copies it into the parameter, which holds an extra copy of every
    ``linear_fc1`` (half of Phi-4's weights) at once. Here the factory is built up front, so
    the halves are views of the parameter and are loaded in place.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    state = {}
    for i, chunk in enumerate(chunks):
        sharded = chunk.sharded_state_dict()
        for key, value in sharded.items():
            if isinstance(value, ShardedTensorFactory):
                sharded[key] = value.build()  # views into the parameter: filled in place
        state[f"model{i}"] = sharded
    dist_checkpointing.load(sharded_state_dict=state, checkpoint_dir=str(iter_dir))


def load_model(iter_dir: Path, cfg: MegaphiConfig, device: torch.device) -> torch.nn.Module:
    """Build the whole model of ``cfg`` (TP=1, PP=1) on ``device`` and load the weights of a
    checkpoint saved at any layout into it. The runtime must be acquired."""
    from megaphi.model.builder import build_model, te_available
    from megaphi.training.checkpoint import load_checkpoint

    if device.type == "cuda" and te_available():  # TE layers: Megatron's own load path
        (model,) = build_model(cfg, use_te=True, device=device)
        layout = {"tp": 1, "pp": 1, "vpp": None, "dp": 1}
        load_checkpoint(Path(iter_dir), [model], None, None, layout, load_optimizer=False)
    else:
        (model,) = build_empty_model(cfg, device)  # every parameter is loaded below
        load_weights_in_place(Path(iter_dir), [model])
    return model.eval()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the nucleus: the smallest set of most likely tokens whose
    probability sums to at least ``top_p`` (the most likely token always stays). ``[b, V]``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass above each token
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ids ``[b]`` from fp32 logits ``[b, V]``: greedy at temperature 0, else
    temperature and top-p sampling."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(top_p_filter(logits / temperature, top_p), dim=-1)
    return sample_from(probs, generator)


def sample_from(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token id per row of ``probs`` ``[b, V]``, by inverse transform sampling: one uniform
    number per row against the cumulative distribution (in float64), the first token whose
    cumulative probability exceeds it (so a token of probability 0 is never drawn).
    ``torch.multinomial`` draws a random number per vocabulary entry instead: over Phi-4's
    100,352 tokens on a CPU it is 3.5x slower and dominates a tiny model's rollouts."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64,
                   device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` naming the bad sampling argument."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclass
class Generation:
    """One completion."""

    token_ids: List[int]
    """Generated ids, ending with the stop token when one was produced."""
    logprobs: List[float]
    """The model's log-probability of each generated token (temperature 1, no top-p)."""
    finish_reason: str
    """``"stop"`` (a stop token was generated) or ``"length"`` (``max_new_tokens`` reached)."""


def chat_prompt(prompt: str, system: Optional[str] = None) -> str:
    """Phi-4's chat format for one user turn, ready for the assistant's answer
    (:func:`megaphi.data.chat.chat_text` with the generation prompt)."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt})
    return chat_text(messages, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class InferenceModel:
    """A checkpoint loaded whole into this process, for logits and generation.

    Use :meth:`from_checkpoint`; call :meth:`close` (or use ``with``) to free the process group
    it may have created.
    """

    def __init__(self, model: torch.nn.Module, config: MegaphiConfig, device: torch.device,
                 checkpoint: Path):
        self.model = model
        self.config = config
        self.device = device
        self.checkpoint = checkpoint
        self._tokenizer = None
        self._closed = False

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: Optional[str] = None,
                        dtype: Optional[str] = None) -> "InferenceModel":
        """Load a checkpoint (run dir, checkpoints dir or ``iter_*`` dir) saved at any layout.

        Args:
            path: where the checkpoint is.
            device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` (default: CUDA when available).
            dtype: ``"fp32"`` or ``"bf16"`` (default: the checkpoint's ``precision.dtype``).
        """
        iter_dir = resolve_checkpoint(path)
        cfg = single_process_config(checkpoint_config(iter_dir), dtype)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        SingleProcessRuntime.acquire(seed=cfg.train.seed)
        try:
            model = load_model(iter_dir, cfg, dev)
        except BaseException:
            SingleProcessRuntime.release()
            raise
        meta = read_meta(iter_dir)
        logger.info("loaded %s (iteration %s, saved at %s) on %s in %s", iter_dir,
                    meta.get("iteration"), meta.get("layout"), dev, cfg.precision.dtype)
        return cls(model, cfg, dev, iter_dir)

    @property
    def tokenizer(self):
        """The tokenizer the checkpoint was trained with (``data.tokenizer``)."""
        if self._tokenizer is None:
            from megaphi.data.tokenizer import check_tokenizer_fits_model, load_tokenizer

            self._tokenizer = load_tokenizer(self.config.data.tokenizer)
            check_tokenizer_fits_model(self._tokenizer, self.config.model.vocab_size)
        return self._tokenizer

    def close(self) -> None:
        """Release the model and the private process group (idempotent)."""
        if not self._closed:
            self._closed = True
            self.model = None
            SingleProcessRuntime.release()

    def __enter__(self) -> "InferenceModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ids(self, token_ids) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(f"token_ids must be a non-empty [s] or [b, s] sequence, got shape "
                             f"{tuple(ids.shape)}")
        vocab = self.config.model.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got {int(ids.min())}.."
                             f"{int(ids.max())}")
        return ids.to(self.device)

    @torch.no_grad()
    def logits(self, token_ids) -> torch.Tensor:
        """Next-token logits (fp32, on the CPU) for every position of ``token_ids``.

        Args:
            token_ids: ``[s]`` or ``[b, s]`` ids (list or tensor).
        Returns:
            ``[s, vocab]`` or ``[b, s, vocab]``.
        """
        ids = self._ids(token_ids)
        batch = ids if ids.ndim == 2 else ids.unsqueeze(0)
        positions = torch.arange(batch.shape[1], device=self.device).expand_as(batch)
        out = self.model(input_ids=batch, position_ids=positions, attention_mask=None)  # [b, s, V]
        out = out.float().cpu()
        return out if ids.ndim == 2 else out[0]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                 seed: Optional[int] = None, num_samples: int = 1) -> List[Generation]:
        """Continue ``prompt_ids`` with the KV cache; one :class:`Generation` per sample.

        Args:
            prompt_ids: the prompt's token ids.
            max_new_tokens: at most this many new tokens per sample.
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_p: nucleus sampling threshold in (0, 1] (1 keeps every token).
            stop_ids: a sample ends after generating any of these (it is included).
            seed: seed of the sampling generator (``None``: nondeterministic).
            num_samples: completions of the same prompt, generated as one batch.
        """
        from megatron.core.inference.contexts import StaticInferenceContext

        check_sampling(max_new_tokens, temperature, top_p)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        prompt = self._ids(list(prompt_ids))
        total = prompt.numel() + max_new_tokens
        if total > self.config.model.seq_length:
            raise ValueError(f"prompt ({prompt.numel()} tokens) + max_new_tokens "
                             f"({max_new_tokens}) exceed the model's context of "
                             f"{self.config.model.seq_length} tokens (model.seq_length); "
                             "shorten the prompt or lower max_new_tokens")
        gen = None
        if temperature > 0.0:
            gen = torch.Generator(device=self.device)
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(seed)
        context = StaticInferenceContext(max_batch_size=num_samples, max_sequence_length=total)
        tokens = prompt.unsqueeze(0).expand(num_samples, -1).contiguous()  # [n, s]
        logits = self._step(tokens, 0, context)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        out_ids, out_lp = [], []
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, temperature, top_p, gen)  # [n]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None])[:, 0]
            out_ids.append(torch.where(done, -1, next_ids))
            out_lp.append(logprobs)
            done |= torch.isin(next_ids, stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self._step(next_ids[:, None], prompt.numel() + step, context)
        return _collect(torch.stack(out_ids, 1).cpu(), torch.stack(out_lp, 1).cpu(), done.cpu())

    def _step(self, tokens: torch.Tensor, offset: int, context) -> torch.Tensor:
        """Run ``tokens`` ``[n, s]`` at positions ``offset..`` through the model with the cache;
        returns the fp32 logits of the last position ``[n, V]``."""
        positions = torch.arange(offset, offset + tokens.shape[1], device=self.device)
        positions = positions.expand_as(tokens)
        if offset > 0:
            context.enable_decode_mode()
        out = self.model(input_ids=tokens, position_ids=positions, attention_mask=None,
                         inference_context=context, runtime_gather_output=True)  # [n, 1, V]
        context.sequence_len_offset += tokens.shape[1]
        return out[:, -1].float()


def _collect(ids: torch.Tensor, logprobs: torch.Tensor, done: torch.Tensor) -> List[Generation]:
    """Per-sample lists from ``[n, steps]`` tensors in which ``-1`` marks steps after a stop."""
    results = []
    for row in range(ids.shape[0]):
        keep = ids[row] >= 0
        results.append(Generation(token_ids=ids[row][keep].tolist(),
                                  logprobs=logprobs[row][keep].tolist(),
                                  finish_reason="stop" if bool(done[row]) else "length"))
    return results


__all__ = ["CheckpointNotFound", "Generation", "InferenceModel", "SingleProcessRuntime",
           "build_empty_model", "chat_prompt", "checkpoint_config",
           "load_model", "load_weights_in_place", "resolve_checkpoint", "sample_next",
           "top_p_filter"]
