"""Runs under ipu_t5.backends.torch_distributed.launch for tests/backends/torch_distributed/test_pipeline.py: one rank fails (or hangs) while the others
wait in a collective, to show the run ends with that rank's message instead of hanging.

    python -m tests.backends.torch_distributed.failing_worker fail|hang|count

`count` joins with a 2 x 2 layout whatever the number of processes launched.
"""
import os
import sys
import time

import torch.distributed as dist

from ipu_t5.backends.torch_distributed.topology import connect
from ipu_t5.errors import UserError
from ipu_t5.backends.torch_distributed.launch import record_failure
from ipu_t5.layout import plan_layout
from ipu_t5.models import canonical_size

TIMEOUT_SECONDS = 3


def main() -> int:
    mode = sys.argv[1]
    world = int(os.environ["WORLD_SIZE"])
    plan = plan_layout(canonical_size("tiny"), 8, stages=2, replicas=2) if mode == "count" else \
        plan_layout(canonical_size("tiny"), world, stages=1, replicas=world)
    try:
        connect(plan, TIMEOUT_SECONDS)
    except UserError as err:
        record_failure(str(err))
        return 2
    if dist.get_rank() == 1:
        if mode == "fail":
            record_failure("the input file is missing")
            return 2
        time.sleep(600)
    try:
        dist.barrier()
    except RuntimeError as err:
        record_failure("{}: {}".format(type(err).__name__, str(err).splitlines()[0]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
