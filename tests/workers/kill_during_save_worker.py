"""``megaphi-train`` whose rank 1 is SIGKILLed in the middle of one checkpoint save; launched by
torchrun.

The kill comes after Megatron's ``dist_checkpointing.save`` has written that rank's shards (the
checkpoint directory holds real data by then) and before megaphi marks the checkpoint complete
and moves ``latest``: the window in which a crash could leave a checkpoint that looks usable.
No cleanup handler runs: SIGKILL cannot be caught. The signal goes to rank 1's whole process
group (torchrun starts each rank in its own session), so the checkpoint writer's helper process
dies with it, as when a node fails.

    torchrun --nproc-per-node 2 kill_during_save_worker.py iter_0000008 --preset tiny ...
"""

import os
import signal
import sys

import torch.distributed as dist

from megaphi.platform import prepare_megatron_import

prepare_megatron_import()
from megatron.core import dist_checkpointing  # noqa: E402

from megaphi.train import main  # noqa: E402



def killing_save(kill_at: str):
    """Megatron's save, followed on rank 1 by SIGKILL (to its process group) when saving the directory ``kill_at``."""
    save = dist_checkpointing.save

    def save_then_die(state, checkpoint_dir, *args, **kwargs):
        result = save(state, checkpoint_dir, *args, **kwargs)
        if os.path.basename(str(checkpoint_dir)) == kill_at and dist.get_rank() == 1:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return result

    return save_then_die


if __name__ == "__main__":  # the checkpoint writer's worker processes re-import this module
    dist_checkpointing.save = killing_save(sys.argv.pop(1))
    sys.exit(main(sys.argv[1:]))
