"""A complete user task: a tiny MLP on three fixed Gaussian blobs (docs/tasks.md).

Run it from this directory (the current directory is on the import path, as with python -m):

    memstate run --task tiny_mlp:TinyMLP --perturbation reset_momentum --seeds 3 --t0 10 --horizon 40
    memstate replay runs/tiny_mlp-TinyMLP-reset_momentum/card.json
"""
import torch
from torch import nn
from torch.nn import functional as F

import memstate


def _blobs(n: int, seed: int):
    """``n`` points of 3 classes around fixed centres: the same for every experiment seed."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])
    return centres[y] + torch.randn(n, 2, generator=g), y


class TinyMLP(memstate.Task):
    metrics = ("accuracy", "loss")                 # optional: derived from evaluate() otherwise
    option_defaults = {"hidden": 16, "lr": 0.1, "momentum": 0.9, "batch_size": 32}

    def __init__(self, **options):
        super().__init__(**options)
        self.x_train, self.y_train = _blobs(512, seed=1)
        self.x_probe, self.y_probe = _blobs(256, seed=2)

    def build(self, seed, *, device="cpu", name=None):
        o = self.options
        return self.new_state(
            seed,
            make_model=lambda: nn.Sequential(nn.Linear(2, o["hidden"]), nn.ReLU(), nn.Linear(o["hidden"], 3)),
            make_optimizer=lambda m: memstate.optim.SGD(m.parameters(), lr=o["lr"], momentum=o["momentum"]),
            n_train=len(self.y_train), batch_size=o["batch_size"], device=device, name=name)

    def train_step(self, state, step):
        ids = torch.as_tensor(state.sampler.batch(step))   # the batch depends only on (seed, step)
        x, y = self.x_train[ids], self.y_train[ids]
        state.optimizer.zero_grad(set_to_none=True)
        with state.contract.step(step):                      # random draws (dropout) are per step
            loss = F.cross_entropy(state.model(x), y)
            loss.backward()
        state.optimizer.step()
        state.step = step + 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, state):
        logits = state.model(self.x_probe)
        return {"accuracy": float((logits.argmax(1) == self.y_probe).double().mean()),
                "loss": float(F.cross_entropy(logits, self.y_probe))}
