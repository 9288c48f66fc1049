"""`T5Trainer` and what its loop uses: validation by generation, checkpoints of the run, the best
metric and early stopping, the metrics log, stop signals and the figures of a run."""
