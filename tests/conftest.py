"""Test-wide settings.

Tiny tensors run 10-100x slower on two torch threads than on one on a 2-core
machine (thread hand-off dominates), and the spawned gloo workers use one
thread each already; the suite does the same.
"""

import torch

torch.set_num_threads(1)
