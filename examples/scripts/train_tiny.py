"""A tiny training script that records an audit trail with memstate.audit.auto().

    python examples/scripts/train_tiny.py [--steps N] [--optim memstate|torch] [--plant STEP]

Deterministic on CPU: seeded init, a fixed data order and memstate's fused Adam. ``--plant S``
plants one nondeterministic operation: at step S the gradient of ``head.weight`` gets a tiny
perturbation read from os.urandom (different in every run), as a nondeterministic kernel would.
"""
import argparse
import os

import torch
from torch import nn

import memstate
from memstate import audit

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=12)
p.add_argument("--optim", choices=["memstate", "torch"], default="memstate")
p.add_argument("--plant", type=int, default=None, help="step at which to perturb head.weight's gradient")
a = p.parse_args()

torch.manual_seed(0)  # numpy and random are left unseeded: the script never draws from them
g = torch.Generator().manual_seed(1)
x_all, y_all = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
model = nn.Sequential()
model.add_module("body", nn.Linear(8, 16))
model.add_module("bn", nn.BatchNorm1d(16))
model.add_module("act", nn.ReLU())
model.add_module("head", nn.Linear(16, 3))
if a.optim == "memstate":
    opt = memstate.optim.Adam(model.parameters(), lr=1e-2, fingerprint=True)
else:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

trail = audit.auto(model, opt)
order = torch.randperm(256, generator=torch.Generator().manual_seed(2))
for step in range(a.steps):
    ids = order[(step * 32) % 256:(step * 32) % 256 + 32]
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x_all[ids]), y_all[ids])
    loss.backward()
    if step == a.plant:
        noise = int.from_bytes(os.urandom(4), "little") / 2**32
        with torch.no_grad():
            model.head.weight.grad[0, 0] += 1e-3 * (1.0 + noise)
    opt.step()
    trail.record(step, loss=loss, batch_ids=ids)
trail.close()
print(f"final loss {loss.item():.6f}")
