"""Runs under torchrun for tests/backends/torch_distributed/test_stage_local.py: builds the trainer of
the tiny run under one layout, without training, and writes what this rank built and read.

    python -m tests.backends.torch_distributed.stage_local_worker OUT STAGES REPLICAS [--pretrained DIR]

Every rank writes OUT/rank<r>.pt: the names of the tensors it read from the weights' files (in
order), its parameters by Hugging Face name at step 0, and the names its stage owns.
"""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.backends.torch_distributed.pipeline_worker import make_config


def main() -> None:
    from ipu_t5.checkpointing import views
    from ipu_t5.training.trainer import T5Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("stages", type=int)
    parser.add_argument("replicas", type=int)
    parser.add_argument("--pretrained")
    args = parser.parse_args()
    read = []
    original = views.SafetensorsView.__getitem__

    def recording(self, name):
        read.append(name)
        return original(self, name)

    views.SafetensorsView.__getitem__ = recording
    dist.init_process_group("gloo")
    extra = ["model.pretrained={}".format(args.pretrained)] if args.pretrained else []
    trainer = T5Trainer(make_config(Path(args.out) / "run", args.stages, args.replicas, extra=extra))
    backend = trainer.backend
    found = {"read": read, "weights": {name: p.detach().clone() for name, p in backend.named},
             "owned": [name for name, _ in backend.named]}
    torch.save(found, str(Path(args.out) / "rank{}.pt".format(os.environ["RANK"])))
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
