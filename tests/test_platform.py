"""Launch-environment parsing for torchrun and SLURM, and Megatron-Core's deferred compiler."""

import subprocess
import sys

import torch

from megaphi.platform import deferred_compile, expand_slurm_nodelist, read_launch_env


def test_torchrun_environment():
    env = read_launch_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "node07", "MASTER_PORT": "6000"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (5, 16, 1, "node07", 6000, "torchrun")


def test_slurm_environment_uses_the_first_node_and_a_per_job_port():
    env = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        9, 16, 1, "gpu007", "slurm")
    assert env.master_port == 20000 + 123456 % 10000


def test_torchrun_wins_under_srun_torchrun():
    env = read_launch_env({"RANK": "0", "WORLD_SIZE": "8", "SLURM_PROCID": "3",
                           "SLURM_NTASKS": "2"})
    assert env.launcher == "torchrun" and env.world_size == 8


def test_single_process_default():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[01-03,07],login1") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_slurm_nodelist("a1,b[9-10]") == ["a1", "b9", "b10"]


def test_deferred_compile_compiles_on_the_first_call(monkeypatch):
    calls = []
    real = torch.compile

    def counting(fn, **kwargs):
        calls.append(kwargs)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)

    @deferred_compile(backend="eager")
    def gelu_ish(x):
        return x * torch.sigmoid(1.702 * x)

    assert calls == [] and gelu_ish.__name__ == "gelu_ish"
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(gelu_ish(x), x * torch.sigmoid(1.702 * x))
    gelu_ish(x)
    assert calls == [{"backend": "eager"}]  # once, on the first call


def test_megatron_imports_without_the_compiler():
    """After prepare_megatron_import(), importing Megatron-Core (its fused functions decorated
    by jit_fuser included) loads neither torch._dynamo nor torch._inductor, and the fused
    functions are deferred torch.compile calls."""
    code = """
import sys
from megaphi.platform import deferred_compile, prepare_megatron_import
prepare_megatron_import()
import megatron.core
from megatron.core.models.gpt import GPTModel
from megatron.core import jit
from megatron.core.fusions import fused_bias_swiglu
assert jit.jit_fuser is deferred_compile, jit.jit_fuser
assert getattr(fused_bias_swiglu.swiglu, "deferred_compile", False)
print(sorted({m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
