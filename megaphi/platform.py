"""The runtime: CUDA + NCCL where a GPU is present, CPU + gloo otherwise, the same model on both.

This module decides the device, reads the launcher's environment (torchrun or SLURM), initialises
``torch.distributed`` and Megatron-Core's parallel groups, seeds the model-parallel RNGs, and on a
machine without CUDA installs the CPU compatibility layer below. Nothing here runs at import time.

CPU compatibility layer
-----------------------
Megatron-Core 0.16.1 assumes CUDA in a few places. :func:`install_cpu_compat` patches exactly these,
and only when ``torch.cuda.is_available()`` is false; ``torch.cuda.is_available()`` itself stays
false so Megatron keeps choosing its non-CUDA code paths (no fused kernels, no CUDA graphs):

1. ``torch.cuda.current_device()`` returns the CPU device. Megatron places tensors with
   ``device=torch.cuda.current_device()`` (parameters, pipeline shape exchange, grad buffers).
2. A ``TorchFunctionMode`` maps every CUDA device argument (``"cuda"``, ``"cuda:N"``, an int
   ordinal, ``torch.device("cuda")``) to the CPU, and makes ``Tensor.cuda()`` a move to the CPU.
   Factories such as ``torch.zeros(..., device="cuda")`` in the pipeline schedules and ``.cuda()``
   calls in the optimizer and checkpointing code would otherwise raise "Torch not compiled with CUDA".
3. ``torch.cuda.synchronize``, ``torch.cuda.empty_cache`` and the stream/event helpers Megatron
   calls around communication become no-ops: on the CPU every op is already synchronous.
4. The CUDA RNG is the CPU RNG: ``torch.cuda.get_rng_state`` / ``set_rng_state`` /
   ``manual_seed`` and Megatron's private ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read
   and write the CPU generator, so ``model_parallel_cuda_manual_seed`` and the RNG tracker's
   ``fork()`` (dropout in tensor-parallel regions) work, with the same per-TP-rank seeding.
5. ``torch.cuda.memory_allocated`` and friends report 0 instead of raising, so memory metrics
   can be logged the same way on both devices.
6. ``Tensor.type()`` (the no-argument form, which returns a type name) reports the CUDA name,
   e.g. ``torch.cuda.FloatTensor`` for a CPU float tensor: Megatron's optimizers and gradient
   clipping dispatch on exactly these names and refuse ``torch.FloatTensor``.
7. Megatron's checkpoint writer starts the server of its results queue with ``spawn``: a fresh
   interpreter that imports torch (about 2 s of CPU) to unpickle the first result, once per
   process that saves. With no CUDA context to protect, the server is forked instead, as
   Megatron's writer processes already are.

Megatron-Core's import
------------------------
Importing Megatron-Core costs about 4.5 s of CPU, of which ~1.7 s is ``torch._dynamo`` and
``torch._inductor``: ``megatron.core.jit`` sets ``jit_fuser = torch.compile`` and a dozen modules
decorate functions with it at import. :func:`prepare_megatron_import`, which every entry point
calls before importing Megatron (:func:`configure_logging` calls it), installs
:func:`defer_megatron_compile`: ``jit_fuser`` becomes :func:`deferred_compile`, which calls
``torch.compile`` on a function's first call instead. What runs is the same (``torch.compile``
compiles on the first call anyway). A process that never calls a fused function (every CPU run)
never imports the compiler: a preprocessing or evaluation process starts ~1.7 s sooner, a
training process ~0.8 s (PyTorch's optimizer imports ``torch._dynamo`` itself).

Two further CPU requirements are met by construction elsewhere, not by patching:
``TransformerConfig`` gets ``use_cpu_initialization=True`` and the CUDA-only fusions turned off
(:mod:`megaphi.model.builder`), and the local layer spec uses megaphi's RMSNorm, which supports
sequence parallelism where ``torch.nn.RMSNorm`` is refused (:mod:`megaphi.model.norm`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.abc
import importlib.machinery
import logging
import os
import re
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megaphi.config.schema import ConfigError, ParallelConfig

logger = logging.getLogger(__name__)

_compat_mode: Optional[TorchFunctionMode] = None


def device_type() -> str:
    """``"cuda"`` when a GPU is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. 'NVIDIA H100 80GB HBM3'), or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# Warnings Megatron-Core emits on every import or call on a machine without Apex / Transformer
# Engine, or for arguments megaphi deliberately leaves to their defaults: noise for users.
_MEGATRON_NOISE = (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r".*tp_group is None, using default tp group.*",
    r".*full scope is deprecated.*",
    r".*reduce_scatter_tensor. is deprecated.*",
    r".*_get_vc_env is private.*",
    r".*will be removed in this file in .megatron-core. 0.14.*",
    r".*torch.jit.script_method. is deprecated.*",
)


def configure_logging(level: str = "INFO", rank: int = 0) -> None:
    """Log megaphi at ``level`` (rank 0; other ranks warnings only) and quiet Megatron's
    import-time warnings and INFO chatter. Call before importing Megatron-Core."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megaphi").setLevel(level if rank == 0 else "WARNING")
    logging.getLogger("megatron").setLevel("WARNING")
    prepare_megatron_import()


def prepare_megatron_import() -> None:
    """Quiet Megatron-Core's import-time warnings and defer its ``torch.compile`` fuser to first
    use (module docstring). Call before importing Megatron-Core."""
    quiet_megatron_warnings()
    defer_megatron_compile()


def quiet_megatron_warnings() -> None:
    """Ignore the warnings listed in ``_MEGATRON_NOISE`` (install before importing Megatron)."""
    for pattern in _MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def deferred_compile(fn=None, **kwargs):
    """``torch.compile(fn, **kwargs)``, called on ``fn``'s first call rather than now (also as
    ``@deferred_compile`` and ``@deferred_compile(**kwargs)``)."""
    if fn is None:
        return functools.partial(deferred_compile, **kwargs)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kw):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, **kwargs)
        return compiled(*args, **kw)

    call.deferred_compile = True
    return call


class _DeferredJitLoader(importlib.abc.Loader):
    """Loads ``megatron.core.jit`` as usual, then swaps its ``torch.compile`` fuser for
    :func:`deferred_compile` before any other Megatron module decorates with it."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = deferred_compile


class _DeferredJitFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "megatron.core.jit":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferredJitLoader(spec.loader)
        return spec


def defer_megatron_compile() -> None:
    """Make Megatron-Core's ``jit_fuser`` :func:`deferred_compile` (module docstring). Call
    before importing Megatron-Core; afterwards (or called twice) it does nothing."""
    if "megatron.core.jit" in sys.modules:
        return
    if not any(isinstance(f, _DeferredJitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferredJitFinder())


# --------------------------------------------------------------------------------------------
# Launch environment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list:
    """Expand a SLURM node list such as ``gpu[01-03,07],login1`` into host names."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def read_launch_env(environ: Optional[dict] = None) -> LaunchEnv:
    """Read rank and rendezvous from torchrun (``RANK``, ...) or SLURM (``SLURM_PROCID``, ...).

    torchrun's variables win when both are set (``srun torchrun`` sets both). Without either,
    this is a single process: :func:`init_runtime` gives it an in-memory store, so it takes no
    port (``MASTER_PORT`` is not used).
    """
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR")
        if addr is None:
            nodes = expand_slurm_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
            addr = nodes[0] if nodes else "127.0.0.1"
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 10000  # distinct per job on shared nodes
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def free_port() -> int:
    """A TCP port that is free on localhost now (for single-process and test rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# CPU compatibility layer
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Patches 2 and 6: CUDA device arguments and ``Tensor.cuda()`` resolve to the CPU, and
    ``Tensor.type()`` reports CUDA type names."""

    _cpu = torch.device("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # 6
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": self._cpu}
        if func in (torch.Tensor.to,) and args[1:] and _is_cuda_device(args[1]):
            args = (args[0], self._cpu, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` where Megatron orders work on streams."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_results_queue = None


def _forked_results_queue():
    """Megatron's ``_get_write_results_queue`` with a forked manager (item 7 above)."""
    global _results_queue
    if _results_queue is None:
        import multiprocessing

        _results_queue = multiprocessing.get_context("fork").Manager().Queue()
    return _results_queue


def install_cpu_compat() -> None:
    """Install the CPU compatibility layer (idempotent; refuses to run where CUDA works)."""
    global _compat_mode
    if _compat_mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_compat() is for machines without CUDA")
    cpu = torch.device("cpu")
    cuda = torch.cuda
    cuda.current_device = lambda: cpu  # 1
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):  # 3
        setattr(cuda, name, lambda *a, **k: None)
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # 4
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",  # 5
                 "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()  # 4
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = _forked_results_queue  # 7

    _compat_mode = _CudaToCpuMode()  # 2
    _compat_mode.__enter__()
    logger.debug("installed the CPU compatibility layer for Megatron-Core")


def enter_cpu_compat_in_this_thread() -> None:
    """Torch function modes are per thread: a thread other than the one that installed the
    CPU compatibility layer (a server's model thread) enters its own copy. A no-op when the
    layer is not installed."""
    if _compat_mode is not None:
        _CudaToCpuMode().__enter__()


# --------------------------------------------------------------------------------------------
# Distributed initialisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """The initialised process: device, backend, rank and the parallel layout it belongs to."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: Optional[int]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_layout(parallel: ParallelConfig, world_size: int, device: str) -> int:
    """Check a layout against the job and the device; return the derived data-parallel size."""
    if parallel.cp > 1 and device != "cuda":
        raise ConfigError("parallel.cp",
                          f"context parallelism (cp={parallel.cp}) needs Transformer Engine's "
                          "attention, which only runs on CUDA GPUs",
                          "set parallel.cp=1 on CPU, or run on GPUs")
    mp = parallel.model_parallel_size
    if world_size % mp != 0:
        raise ConfigError("parallel",
                          f"the world size {world_size} is not a multiple of tp*pp*cp = "
                          f"{parallel.tp}*{parallel.pp}*{parallel.cp} = {mp}",
                          f"launch a multiple of {mp} processes, or change parallel.tp/pp/cp")
    return world_size // mp


def init_runtime(parallel: ParallelConfig, seed: int, timeout_minutes: int = 10,
                 env: Optional[LaunchEnv] = None) -> Runtime:
    """Initialise torch.distributed, Megatron's parallel groups and the model-parallel RNG.

    Validates the layout against the world size and device before creating any group.
    """
    from megatron.core import parallel_state, tensor_parallel

    env = env or read_launch_env()
    dev = device_type()
    dp = check_layout(parallel, env.world_size, dev)
    if dev == "cpu":
        install_cpu_compat()
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if env.launcher == "single" and env.world_size == 1:  # no rendezvous: no port to take
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend, rank=env.rank, world_size=env.world_size,
                init_method=f"tcp://{env.master_addr}:{env.master_port}", timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.pp > 1 else None,
        context_parallel_size=parallel.cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    rt = Runtime(device=device, backend=backend, rank=env.rank, world_size=env.world_size,
                 local_rank=env.local_rank, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, dp=dp,
                 vpp=parallel.vpp)
    if rt.is_main:
        logger.info("runtime: %s/%s, world %d = tp %d x pp %d x cp %d x dp %d (launcher: %s)",
                    device.type, backend, env.world_size, rt.tp, rt.pp, rt.cp, rt.dp, env.launcher)
    return rt


@contextlib.contextmanager
def single_process_group():
    """A private one-process gloo group for code that needs torch.distributed outside a job
    (counting parameters, building dataset caches from a tool). A no-op inside a job."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shutdown_runtime() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
