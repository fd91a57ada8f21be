#!/usr/bin/env python3
"""Robustness leaderboard: ``python eval_robust.py --checkpoints runs/*/export --output results/``.

Also ``accelerate launch eval_robust.py ...`` and ``torchrun --nproc_per_node N eval_robust.py ...`` (the examples are
sharded over the processes; the numbers do not change). ``--help`` lists the options; the evaluation lives in
:mod:`odenet_timm.robust`.
"""
import sys

from odenet_timm.robust.cli import main

if __name__ == '__main__':
    sys.exit(main())
