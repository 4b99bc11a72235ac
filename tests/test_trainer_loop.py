"""The training loop's accounting, on a controlled clock: step time (and so throughput and MFU)
covers loading and the step, never validation or checkpoint saves.

The model-dependent parts of :class:`Trainer` (``step`` and ``evaluate``, checked end to end
by the distributed tests) are replaced by ones that only advance the clock; the loop, the
metrics writer, Megatron's LR scheduler and the checkpoint trigger are the real ones.
"""

import json

import torch

from megaphi.config import load_config
from megaphi.platform import Runtime
from megaphi.training import trainer as trainer_module
from megaphi.training.metrics import MetricsWriter
from megaphi.training.trainer import StepResult, Trainer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedTrainer(Trainer):
    """Each step takes 2 s of the clock, each validation 50 s; saves take 100 s."""

    def step(self, micro_batches):
        self.clock.now += 2.0
        return StepResult({"loss": 1.0, "loss_tokens": 10}, grad_norm=1.0, skipped=False,
                          data_tokens=100)

    def evaluate(self, batches):
        self.clock.now += 50.0
        return {"loss": 1.0}


def test_step_time_excludes_validation_and_saving(tmp_path, monkeypatch):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    clock = Clock()
    monkeypatch.setattr(trainer_module.time, "perf_counter", clock)
    cfg = load_config("tiny", overrides=["train.iters=8", "train.log_interval=4",
                                         "schedule.warmup_iters=0",
                                         "train.eval_interval=2", "checkpoint.interval=1",
                                         "train.micro_batch_size=4",
                                         "train.global_batch_size=4"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=32,
        lr_decay_style="linear", start_wd=0.0, end_wd=0.0, wd_incr_steps=32,
        wd_incr_style="constant")
    rt = Runtime(device=torch.device("cpu"), backend="gloo", rank=0, world_size=1,
                 local_rank=0, tp=1, pp=1, cp=1, dp=1, vpp=None)
    writer = MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    saves = []

    def save():
        clock.now += 100.0
        saves.append(clock.now)

    batches = iter(lambda: {"tokens": torch.zeros(4, 8, dtype=torch.long)}, None)
    trainer = TimedTrainer(cfg, rt, [], optimizer, scheduler, writer, phase=None, save=save,
                           valid_batches=lambda: iter(()))
    trainer.clock = clock
    trainer._to_device = lambda batch: batch
    try:
        trainer.train(batches, iters=8)
    finally:
        trainer.preemption.restore()
        writer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "step_time_s" in r]
    assert len(saves) == 8 and [r["step"] for r in train] == [4, 8]
    assert all(r["step_time_s"] == 2.0 for r in train)  # not (4*2 + 2*50 + 4*100) / 4
    assert all(r["real_tokens_per_s"] == 50.0 for r in train)
    assert all(r["tokens_per_s"] == 4 * cfg.model.seq_length / 2.0 for r in train)
    assert sum("val_loss" in r for r in records) == 4
