#!/usr/bin/env python3
"""Train a model: ``python train.py --config configs/digits_resnet.yaml --output runs/r20``.

Also ``accelerate launch [--multi_gpu --num_processes N] train.py ...`` and ``torchrun``; ``--help`` lists the
options. The training itself lives in :mod:`odenet_timm.train`.
"""
import sys

from odenet_timm.train import main

if __name__ == '__main__':
    sys.exit(main())
