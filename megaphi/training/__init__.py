"""The trainer shared by every phase: forward step, pipeline schedules, optimizer, checkpoints."""
