"""Import Hugging Face ``Phi3ForCausalLM`` checkpoints into megaphi and export megaphi checkpoints.

Import (:func:`import_hf_checkpoint`) reads ``config.json`` and the safetensors index, checks them
(architecture, every tensor present with the right shape, and, given a target run config, the
vocabulary, heads, KV heads, RoPE base, ... against it) before any weight is read. It then builds
this rank's part of the Megatron-Core model on the CPU, streams the Hugging Face tensors into it
one at a time (each file is opened, read tensor by tensor and closed; a tensor is reordered
(fused QKV) and cut to this rank's shard, copied into the pre-allocated parameter and dropped),
and saves the model with ``megatron.core.dist_checkpointing``. Peak memory is therefore the
model's parameters (one copy of the weights, or 1/(tp*pp) of it per rank) plus a transient
Hugging Face tensor or two (:func:`fill_from_hf` says how the save avoids copying the MLP).
The output is a checkpoints directory in the format of
:mod:`megaphi.training.checkpoint` (``iter_0000000/`` with ``megaphi.json`` and a ``latest``
pointer, model weights only) that loads at any TP / PP. It runs in one process, or under
torchrun with ``tp * pp`` processes, each filling and saving its own shards.

Export (:func:`export_hf_checkpoint`) loads a checkpoint saved at any layout into the whole model
in one process and writes safetensors shards with ``model.safetensors.index.json``,
``config.json``, ``generation_config.json`` and the Phi-4 tokenizer files.

Both write into a hidden ``.<name>.incomplete`` directory next to the output and rename it at
the end, so an interrupted conversion never leaves an output that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaphi.config.schema import DataConfig, MegaphiConfig, ModelConfig, PrecisionConfig
from megaphi.data.tokenizer import PHI4_VOCAB_SIZE
from megaphi.hf import mapping

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ITERATION_DIR = "iter_0000000"  # megaphi.training.checkpoint.iteration_dir(root, 0)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


class ConversionError(ValueError):
    """Bad conversion input; the message names the file or option and the fix."""


# --------------------------------------------------------------------------------------------
# Reading a Hugging Face directory (cheap: config, index and safetensors headers only)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFCheckpoint:
    """A Hugging Face model directory: its ``config.json`` and where each tensor is stored."""

    directory: Path
    config: dict
    files: Dict[str, Path]
    """Tensor name -> safetensors file."""

    def tensors_by_file(self) -> Dict[Path, List[str]]:
        """Tensor names grouped by file, files in name order (one open file at a time)."""
        grouped: Dict[Path, List[str]] = {}
        for name, path in sorted(self.files.items(), key=lambda item: (str(item[1]), item[0])):
            grouped.setdefault(path, []).append(name)
        return grouped

    @property
    def torch_dtype(self) -> Optional[str]:
        """The dtype ``config.json`` declares (``torch_dtype``, or ``dtype`` in transformers 5)."""
        return self.config.get("torch_dtype") or self.config.get("dtype")


def read_hf_checkpoint(hf_dir: str) -> HFCheckpoint:
    """Read ``config.json`` and the weight index of a Hugging Face directory."""
    directory = Path(hf_dir)
    if not directory.is_dir():
        raise ConversionError(f"--hf-dir {directory} is not a directory; pass the directory that "
                              "holds config.json and the *.safetensors files")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} does not exist; --hf-dir must be a Hugging Face "
                              "model directory (config.json plus safetensors weights), e.g. a "
                              "download of microsoft/phi-4")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_path} is not valid JSON ({exc}); re-download it") from None
    return HFCheckpoint(directory, config, _weight_files(directory))


def _weight_files(directory: Path) -> Dict[str, Path]:
    index_path = directory / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(f"{index_path} is not a safetensors index with a 'weight_map' "
                                  f"({exc!r}); re-download it") from None
        files = {name: directory / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConversionError(f"{path.name} is listed in {index_path} but missing; "
                                      "download every shard of the checkpoint")
        return files
    single = directory / SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    if any(directory.glob("*.bin")):
        raise ConversionError(f"{directory} holds PyTorch .bin weights; megaphi reads safetensors "
                              "only: re-save with save_pretrained(safe_serialization=True)")
    raise ConversionError(f"{directory} has neither {INDEX} nor {SINGLE}; pass a directory with "
                          "safetensors weights")


def check_hf_tensors(hf: HFCheckpoint, model: ModelConfig) -> None:
    """Every tensor the model needs is present with the right shape, and nothing unknown is
    there (reads only the safetensors headers)."""
    from safetensors import safe_open

    expected = mapping.hf_tensor_shapes(model)
    missing = [name for name in expected if name not in hf.files]
    if missing:
        raise ConversionError(f"{hf.directory} lacks {len(missing)} tensor(s) the model in "
                              f"config.json needs, first {missing[0]!r}; the weights do not match "
                              "config.json (download every shard, or fix config.json)")
    unknown = [n for n in hf.files if n not in expected and not mapping.IGNORED_HF_TENSORS.search(n)
               and not (n == "lm_head.weight" and model.tie_embeddings)]
    if unknown:
        raise ConversionError(f"{hf.files[unknown[0]].name} holds {unknown[0]!r}, which a "
                              f"{mapping.ARCHITECTURE} with this config.json does not have; "
                              "convert a plain Phi-3/Phi-4 checkpoint")
    for path, names in hf.tensors_by_file().items():
        with safe_open(str(path), framework="pt") as handle:
            for name in (n for n in names if n in expected):
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ConversionError(f"{path.name}: {name} has shape {list(shape)}, but "
                                          f"config.json implies {list(expected[name])}; the "
                                          "weights do not match config.json")


# --------------------------------------------------------------------------------------------
# The run config of an import
# --------------------------------------------------------------------------------------------


def _precision_for(hf: HFCheckpoint) -> str:
    """megaphi ``precision.dtype`` keeping the Hugging Face values exactly: bf16 for bfloat16,
    fp32 for float32 and float16 (fp16 values are exact in fp32)."""
    return "bf16" if hf.torch_dtype == "bfloat16" else "fp32"


def import_config(hf: HFCheckpoint, target: Optional[MegaphiConfig], tp: int = 1,
                  pp: int = 1) -> MegaphiConfig:
    """The config an import records: ``target`` (checked against ``config.json``) or, without
    one, the model described by ``config.json``; laid out at ``tp`` x ``pp``."""
    source = str(hf.directory / "config.json")
    if target is None:
        model = ModelConfig(**mapping.model_fields_from_hf(hf.config, source))
        tokenizer = "phi4"  # the offline Phi-4 tokenizer, unless the vocabulary is another one
        if model.vocab_size != PHI4_VOCAB_SIZE and (hf.directory / "tokenizer.json").is_file():
            tokenizer = str(hf.directory.resolve())
        cfg = MegaphiConfig(model=model, precision=PrecisionConfig(dtype=_precision_for(hf)),
                            data=DataConfig(tokenizer=tokenizer))
    else:
        mapping.check_hf_against_model(hf.config, target.model, source)
        cfg = target
        if target.precision.dtype == "bf16" and hf.torch_dtype in ("float32", "float16"):
            logger.warning("%s stores %s weights; the bf16 target rounds them to bfloat16",
                           source, hf.torch_dtype)
    parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, vpp=None, cp=1,
                                   sequence_parallel=cfg.parallel.sequence_parallel and tp > 1)
    return dataclasses.replace(cfg, parallel=parallel)  # validates tp / pp against the model


def plan_import(hf_dir: str, target: Optional[MegaphiConfig] = None, tp: int = 1,
                pp: int = 1) -> Tuple[HFCheckpoint, MegaphiConfig]:
    """Every check of an import, before any weight is read."""
    hf = read_hf_checkpoint(hf_dir)
    cfg = import_config(hf, target, tp, pp)
    check_hf_tensors(hf, cfg.model)
    return hf, cfg


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _check_new_output(out: Path, flag: str) -> Path:
    """Refuse an existing, non-empty output; return the temporary directory to write into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{flag} {out} already exists and is not empty; choose a new "
                              "directory or delete it")
    return out.parent / f".{out.name}.incomplete"


def _finish_output(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked before)
    os.replace(tmp, out)


@contextlib.contextmanager
def _import_runtime(cfg: MegaphiConfig):
    """A private one-process runtime, the caller's runtime when it already has this layout,
    or torchrun's processes initialised at ``cfg.parallel``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaphi.inference import SingleProcessRuntime
    from megaphi.platform import init_runtime, read_launch_env, shutdown_runtime

    env = read_launch_env()
    size = cfg.parallel.tp * cfg.parallel.pp
    if size > 1 and dist.is_initialized() and ps.model_parallel_is_initialized():
        ours = (ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size(), dist.get_world_size())
        if ours != (cfg.parallel.tp, cfg.parallel.pp, size):
            raise ConversionError(f"this job runs tp={ours[0]} pp={ours[1]} on {ours[2]} "
                                  f"processes; the import needs tp={cfg.parallel.tp} "
                                  f"pp={cfg.parallel.pp} on {size}")
        yield dist.get_rank()  # inside a job at this layout: use its runtime
        return
    if env.world_size != size:
        raise ConversionError(
            f"--tp {cfg.parallel.tp} --pp {cfg.parallel.pp} imports with {size} process(es), but "
            f"{env.world_size} were launched; run `torchrun --nproc-per-node {size} "
            "tools/convert_checkpoint.py import ...` (or plain python for --tp 1 --pp 1)")
    if size == 1:
        SingleProcessRuntime.acquire(seed=cfg.train.seed)
        try:
            yield 0
        finally:
            SingleProcessRuntime.release()
        return
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed, env=env)
    try:
        yield rt.rank
    finally:
        shutdown_runtime()


@torch.no_grad()
def fill_from_hf(chunks: List[torch.nn.Module], hf: HFCheckpoint, model: ModelConfig,
                 progress: bool = False) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Copy this rank's shard of every parameter from the Hugging Face tensors, streaming: one
    file open and one Hugging Face tensor in memory at a time.

    The SwiGLU ``linear_fc1`` shards are not written into their parameters but kept as separate
    ``(gate, up)`` tensors, returned by the parameter's ``data_ptr()``: Megatron saves the two
    halves of ``linear_fc1`` as two sharded tensors, and the checkpoint writer clones any tensor
    that is a view into a larger storage, which for half-views of every ``linear_fc1`` would add
    half a copy of the model (Phi-4's FFN is half its weights) at save time. The parameters stay
    untouched (never resident) and :func:`save_model_checkpoint` saves the separate halves.
    """
    from megatron.core import parallel_state as ps
    from safetensors import safe_open
    from tqdm import tqdm

    from megaphi.model.partition import named_global_parameters, shard

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    params = dict(named_global_parameters(chunks))
    wanted: Dict[str, List[str]] = {}
    for name in params:
        wanted.setdefault(mapping.hf_source_of(name, model), []).append(name)
    halves: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    filled = set()
    with tqdm(total=len(wanted), unit="tensor", desc="import", disable=not progress) as bar:
        for path, names in hf.tensors_by_file().items():
            todo = [n for n in names if n in wanted]
            if not todo:
                continue
            with safe_open(str(path), framework="pt") as handle:
                for hf_name in todo:
                    tensor = handle.get_tensor(hf_name)
                    for global_name in wanted[hf_name]:
                        param = params[global_name]
                        part = shard(mapping.hf_to_megatron(global_name, tensor, model), param,
                                     tp_rank, tp_size)
                        if global_name.endswith(mapping.FC1_SUFFIX):  # [gate_r; up_r]
                            halves[param.data_ptr()] = tuple(
                                h.to(dtype=param.dtype, copy=True) for h in torch.chunk(part, 2))
                        else:
                            param.copy_(part)
                        filled.add(global_name)
                    del tensor, part
                    bar.update(1)
    unfilled = sorted(set(params) - filled)
    if unfilled:  # check_hf_tensors makes this unreachable for a consistent directory
        raise ConversionError(f"no Hugging Face tensor filled {unfilled[0]}")
    return halves


def _model_sharded_state(chunks: List[torch.nn.Module],
                         halves: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """``{"model{i}": sharded state}`` as training saves it, with each ``linear_fc1`` factory
    built into its (gate, up) sharded tensors and pointed at the separate halves."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    state = {}
    for i, chunk in enumerate(chunks):
        sharded = chunk.sharded_state_dict()
        for key, value in sharded.items():
            if isinstance(value, ShardedTensorFactory) and value.data.data_ptr() in halves:
                built = value.build()  # [gate, up] views of the (untouched) parameter
                for sh_ten, half in zip(built, halves[value.data.data_ptr()]):
                    if sh_ten.data.shape != half.shape:
                        raise RuntimeError(f"{key}: half of shape {tuple(half.shape)} does not "
                                           f"fit {tuple(sh_ten.data.shape)}")
                    sh_ten.data = half
                sharded[key] = built
        state[f"model{i}"] = sharded
    return state


def save_model_checkpoint(chunks: List[torch.nn.Module], directory: Path, cfg: MegaphiConfig,
                          source: dict,
                          halves: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None
                          ) -> None:
    """Save model weights in megaphi's checkpoint format (collective over the job): the sharded
    ``model{i}`` state under ``directory/iter_0000000``, then (rank 0) ``megaphi.json`` and the
    ``latest`` pointer, last. ``halves`` are :func:`fill_from_hf`'s ``linear_fc1`` halves."""
    import megatron.core
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    import megaphi

    target = directory / ITERATION_DIR
    state = _model_sharded_state(chunks, halves or {})
    dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=str(target))
    dist.barrier()
    if dist.get_rank() == 0:
        p = cfg.parallel
        meta = {"iteration": 0, "megaphi_version": megaphi.__version__,
                "megatron_core_version": megatron.core.__version__,
                "layout": {"tp": p.tp, "pp": p.pp, "vpp": None, "dp": 1},
                "config": cfg.to_dict(), "source": source}
        (target / "megaphi.json").write_text(json.dumps(meta, indent=2, default=str))
        (directory / "latest").write_text(target.name + "\n")


def import_hf_checkpoint(hf_dir: str, out: str, target: Optional[MegaphiConfig] = None,
                         tp: int = 1, pp: int = 1, progress: bool = False) -> Path:
    """Convert a Hugging Face ``Phi3ForCausalLM`` directory into a megaphi checkpoints directory.

    Args:
        hf_dir: directory with ``config.json`` and safetensors weights.
        out: the checkpoints directory to create (``out/iter_0000000``, ``out/latest``).
        target: the run config to import into (checked against ``config.json``); ``None``
            takes the model from ``config.json``.
        tp, pp: layout of the import; ``tp * pp > 1`` runs under torchrun with that many
            processes. The checkpoint loads at any layout either way.
        progress: show a progress bar (rank 0).
    Returns:
        ``out``.
    """
    import torch.distributed as dist

    from megaphi.inference import build_empty_model

    hf, cfg = plan_import(hf_dir, target, tp, pp)
    out_path = Path(out)
    tmp = _check_new_output(out_path, "--out")
    with _import_runtime(cfg) as rank:
        if rank == 0:
            logger.info("importing %s: %d layers, hidden %d, %d/%d heads, vocab %d, %s, tp=%d "
                        "pp=%d", hf.directory, cfg.model.num_layers, cfg.model.hidden_size,
                        cfg.model.num_attention_heads, cfg.model.num_kv_heads,
                        cfg.model.vocab_size, cfg.precision.dtype, tp, pp)
            shutil.rmtree(tmp, ignore_errors=True)  # a stale one from an interrupted import
            (tmp / ITERATION_DIR).mkdir(parents=True)
        dist.barrier()
        try:
            chunks = build_empty_model(cfg, torch.device("cpu"))  # every parameter is filled
            halves = fill_from_hf(chunks, hf, cfg.model, progress=progress and rank == 0)
            source = {"format": "huggingface", "path": str(hf.directory.resolve()),
                      "architecture": mapping.ARCHITECTURE, "torch_dtype": hf.torch_dtype}
            save_model_checkpoint(chunks, tmp, cfg, source, halves)
            dist.barrier()
            if rank == 0:
                _finish_output(tmp, out_path)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        dist.barrier()
    logger.info("wrote %s (loads at any TP/PP: megaphi-train checkpoint.load=%s)", out_path,
                out_path)
    return out_path


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"5GB"``, ``"200MB"``, ``"1.5GiB"`` or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB or 500MB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def shard_plan(sizes: List[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets a
    shard of its own), as ``save_pretrained`` does."""
    shards: List[List[str]] = [[]]
    current = 0
    for name, size in sizes:
        if shards[-1] and current + size > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _write_weights(model: torch.nn.Module, cfg: MegaphiConfig, out: Path, dtype: torch.dtype,
                   max_bytes: int, progress: bool) -> Tuple[int, int]:
    """Write the safetensors shards and the index; returns (shards, bytes)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megaphi.model.partition import named_global_parameters

    params = dict(named_global_parameters([model]))
    order = list(mapping.export_order(list(params)))
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = shard_plan([(n, params[n].numel() * itemsize) for n in order], max_bytes)
    weight_map, total = {}, 0
    with tqdm(total=len(order), unit="tensor", desc="export", disable=not progress) as bar:
        for k, names in enumerate(plan, start=1):
            fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for name in names:
                hf_name, tensor = mapping.megatron_to_hf(name, params[name].detach(), cfg.model)
                tensors[hf_name] = tensor.to(device="cpu", dtype=dtype).contiguous()
                weight_map[hf_name] = fname
                total += tensors[hf_name].numel() * itemsize
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors
            bar.update(len(names))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(plan), total


def _special_token_ids(cfg: MegaphiConfig) -> Optional[Dict[str, int]]:
    """bos / eos / pad ids of the checkpoint's tokenizer when it is not Phi-4's (whose ids
    ``mapping`` knows): <|endoftext|> begins, <|im_end|> (else the tokenizer's end of document)
    ends a chat turn, and padding is the tokenizer's pad token (else the end of document)."""
    spec = cfg.data.tokenizer
    if spec == "phi4" or not Path(spec).is_dir():
        return None
    from megaphi.data.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    vocab = tok._tok.get_vocab()
    return {"bos": vocab.get("<|endoftext|>", tok.eod_id),
            "eos": vocab.get("<|im_end|>", tok.eod_id), "pad": tok.pad_id}


def _write_tokenizer(cfg: MegaphiConfig, out: Path) -> List[str]:
    """The tokenizer files of the checkpoint's tokenizer, when they can be produced."""
    from megaphi.hf.tokenizer import phi4_tokenizer_fits, write_phi4_tokenizer

    spec = cfg.data.tokenizer
    if spec == "phi4" and phi4_tokenizer_fits(cfg.model.vocab_size):
        return write_phi4_tokenizer(out, model_max_length=cfg.model.seq_length)
    if spec != "phi4" and Path(spec).is_dir():
        files = [p for p in Path(spec).iterdir() if p.is_file() and p.name.startswith(
            ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens"))]
        for path in files:
            shutil.copy2(path, out / path.name)
        return sorted(p.name for p in files)
    logger.warning("no tokenizer files written: data.tokenizer=%s with a %d-row vocabulary",
                   spec, cfg.model.vocab_size)
    return []


def export_hf_checkpoint(ckpt: str, out: str, dtype: Optional[str] = None,
                         max_shard_size: str = "5GB", progress: bool = False) -> Path:
    """Write a megaphi checkpoint (saved at any TP / PP) as a Hugging Face directory.

    Args:
        ckpt: a run directory, its checkpoints directory or one ``iter_*`` directory.
        out: the directory to create.
        dtype: ``"fp32"`` or ``"bf16"`` for the exported tensors (default: the checkpoint's
            ``precision.dtype``).
        max_shard_size: largest safetensors file, e.g. ``"5GB"``.
        progress: show a progress bar.
    Returns:
        ``out``.
    """
    from megaphi.inference import (
        SingleProcessRuntime,
        checkpoint_config,
        load_model,
        resolve_checkpoint,
        single_process_config,
    )

    max_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    iter_dir = resolve_checkpoint(ckpt)
    cfg = single_process_config(checkpoint_config(iter_dir))
    out_dtype = dtype or cfg.precision.dtype
    token_ids = _special_token_ids(cfg)
    hf_config = mapping.hf_config_from_model(cfg.model, _HF_DTYPE_NAMES[out_dtype],
                                             token_ids)  # may refuse
    out_path = Path(out)
    tmp = _check_new_output(out_path, "--out")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        SingleProcessRuntime.acquire(seed=cfg.train.seed)
        try:
            model = load_model(iter_dir, cfg, torch.device("cpu"))
            shards, total = _write_weights(model, cfg, tmp, _DTYPES[out_dtype], max_bytes,
                                           progress)
            del model
        finally:
            SingleProcessRuntime.release()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(mapping.generation_config(token_ids), indent=2) + "\n")
        tokenizer_files = _write_tokenizer(cfg, tmp)
        _finish_output(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %d shard(s), %.2f GB of %s weights, tokenizer files %s", out_path,
                shards, total / 1e9, _HF_DTYPE_NAMES[out_dtype], tokenizer_files or "none")
    return out_path


__all__ = ["ConversionError", "HFCheckpoint", "check_hf_tensors", "export_hf_checkpoint",
           "import_config", "import_hf_checkpoint", "parse_size", "plan_import",
           "read_hf_checkpoint", "shard_plan"]
