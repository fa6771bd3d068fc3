"""The largest training job a client may ask the server for (StartTraining).

:class:`reidal.training.TrainConfig` checks that each value makes sense (epochs >= 1,
lr > 0, momentum in [0, 1), ...) and is the library's own check, for any caller; it sets
no upper bound, since a cluster job may rightly be large. A server job runs in the
server's process on a client's say-so, so its config is also bounded from above here:
a value beyond these would only tie the server up (iters_per_epoch = 2**32 - 1 is a job
that never ends) or make nonsense (a learning rate of 1e6). training.proto states the same
ranges on the TrainingConfig fields; a config beyond them is INVALID_ARGUMENT naming the
field.

The bounds are operational choices of this project (not the method's): each is at least
ten times the value SpCL or the server's small-collection schedule uses.
"""

from __future__ import annotations

from typing import Any

from reidal.errors import InvalidArgument

#: Largest value of each bounded TrainingConfig field (the lower bounds are TrainConfig's).
MAXIMA: dict[str, float] = {
    "epochs": 1000,  # SpCL 50, server 25
    "epochs_per_cycle": 1000,
    "iters_per_epoch": 100_000,  # SpCL 400, server 50
    "num_identities": 1024,  # SpCL 16
    "num_instances": 64,  # SpCL 4
    "step_size": 1000,
    "min_samples": 1000,  # SpCL 4
    "k1": 1000,  # SpCL 30
    "k2": 1000,  # SpCL 6
    "lr": 1.0,  # SpCL 3.5e-4, server 1e-4
    "weight_decay": 1.0,  # SpCL 5e-4
    "temperature": 1.0,  # SpCL 0.05
    "trainable_stages": 7,  # EfficientNet-Lite0's stages; partial mode 1
    "augment_views": 64,  # partial mode 4 (each view is a cached map per image)
    "pair_loss_weight": 100.0,  # server jobs 1 (head and partial schedules)
}
#: Most optimiser steps in one job (epochs x iters_per_epoch; SpCL 20,000, server 1,250).
MAX_TOTAL_STEPS = 1_000_000


def check_job_config(config: Any) -> None:
    """InvalidArgument naming the first field of ``config`` (a TrainConfig) beyond its
    bound, or the schedule when epochs x iters_per_epoch exceeds MAX_TOTAL_STEPS."""
    for name, most in MAXIMA.items():
        value = getattr(config, name)
        if value > most:
            shown = int(most) if float(most).is_integer() else most
            raise InvalidArgument(f"config.{name} must be <= {shown} for a server training "
                                  f"job, got {value}")
    steps = config.epochs * config.iters_per_epoch
    if steps > MAX_TOTAL_STEPS:
        raise InvalidArgument(
            f"config.epochs x config.iters_per_epoch = {steps} optimiser steps; a server "
            f"training job may take at most {MAX_TOTAL_STEPS}")
