"""Launch-environment parsing for torchrun and SLURM."""

from megaphi.platform import expand_slurm_nodelist, read_launch_env


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
