"""Shared test settings.

Tests run on small tensors, where one thread is fastest and keeps parallel CI jobs from
fighting over cores (two 2-thread torch processes on 2 cores run 4x slower than one).
"""

import torch

torch.set_num_threads(1)
