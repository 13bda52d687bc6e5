"""What a SLURM job runs: the task's function, requeued by submitit on preemption or time-out."""
from __future__ import annotations

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment


class ResumableCall(Checkpointable):
    """``fn(*args)`` inside a SLURM job.

    On preemption or time-out submitit calls ``checkpoint`` and requeues the job with what it returns:
    this same call. Running it again is the resume: the runner continues from ``checkpoints/last.pth``
    in its result directory. In a multi-task job (one task per GPU, possibly over several nodes) every
    task exports the torchrun-style variables that istr/engine reads before calling ``fn``.
    """

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self):
        if submitit.JobEnvironment().num_tasks > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Every GPU stays
            # visible: the engine picks cuda:LOCAL_RANK itself.
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return self.fn(*self.args)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        return DelayedSubmission(self, *args, **kwargs)
