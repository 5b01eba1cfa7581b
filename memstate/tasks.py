"""Built-in training tasks for branch-and-hold experiments: small, real, seconds per seed on CPU.

A *task* builds a complete training state from a seed and trains it one step at a time as a
pure function of ``(state, step)``, so that two arms replay bitwise-identical minibatches,
augmentations and dropout masks except where a perturbation primitive changed them::

    import memstate.tasks as tasks
    tasks.names()                        # ('digits', 'teacher', 'ema_queue')
    task = tasks.get("digits", optimizer="adamw")
    state = task.build(seed=0)           # a memstate.perturb.TrainState, step 0
    for t in range(task.horizon):
        loss = task.train_step(state, t)
    task.evaluate(state)                 # {'accuracy': ..., 'loss': ..., 'ece': ...}

``tasks.get(name, **options)`` raises ValueError listing the valid names for an unknown task
and the valid options for an unknown option (``Task.defaults`` lists them with defaults).
``name`` may also be the import path ``"package.module:Class"`` of a user ``Task`` subclass
(``load``; the current directory is put on ``sys.path`` first, as ``python -m`` does): only
``build``, ``train_step`` and ``evaluate`` are required, the rest has defaults (``Task``'s
docstring, docs/tasks.md). ``task_source(task)`` is what a card records of it (import path,
resolved options, xxh3-128 of the module's source file).

The interface (``Task``):

- ``name``, ``metrics`` (probe metrics, in report order), ``higher_is_better`` (per metric),
  ``options`` (resolved), ``horizon`` (default number of training steps), ``defaults``;
- ``build(seed, *, device="cpu", name=None) -> TrainState``: fully determined by ``seed``.
  ``state.contract = RngContract(seed, name=name or f"{task}/seed{seed}/{uuid8}")``
  (registered, so every ``Snapshot`` carries its consumption log; the name is unique among live
  contracts unless you pass one). Weights are drawn on the CPU from
  ``contract.generator("init")`` (one generator for the whole model, in module order: conv and
  linear layers get torch's default init, kaiming-uniform(a=sqrt 5) weights and
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases; BatchNorm weight 1, bias 0), then moved to
  ``device``, so the initial weights are the same on every device; module construction happens
  inside ``torch.random.fork_rng`` so building never moves the global RNG. ``state.sampler =
  OrderSampler(n_train, batch_size, policy=policy, contract=state.contract)``;
  ``state.step = 0``; ``state.extra`` per task (below);
- ``train_step(state, step) -> float``: one optimizer step on the ids
  ``state.sampler.batch(step)`` (overrides applied). Augmentation noise comes from
  ``contract.generator("augment", step=step)`` (a CPU generator, moved to the device), the
  forward and backward pass run under ``with contract.step(step):`` (dropout masks), then the
  optimizer steps, EMA shadows / the teacher are updated (the teacher is skipped while
  ``memstate.perturb.teacher_frozen(state)``) and the queue is written, all in place.
  Sets ``state.step = step + 1`` and returns the training loss of the step (before the update).
  Nothing else is read: the sampler's iteration cursor (epoch/position) is neither used nor
  advanced, so the batch of a step depends only on the contract seed and the overrides;
- ``evaluate(state) -> {metric: float}`` on the task's FIXED probe set (the same for every
  seed, arm and device), under ``torch.no_grad()`` with the model in eval mode (BatchNorm
  running statistics, no dropout); the modules' train/eval flags are restored afterwards and
  no tensor, RNG or contract log is touched;
- ``predictions(state) -> Tensor``: the probe predictions (CPU): class ids (int64 ``[n_probe]``)
  or regression outputs (float32 ``[n_probe]``, ``[n_probe, out_dim]`` for out_dim > 1);
- ``snapshot_sources(state) -> dict``: keyword arguments for ``memstate.Snapshot.capture``:
  model, optimizer, sampler and the tensor/module entries of ``state.extra``;
- ``probe_set(device="cpu") -> (inputs, targets)`` and ``to_json()`` (for protocol cards).

Probe metrics:

- ``accuracy``: fraction of probe examples whose arg-max class is the label;
- ``loss``: mean cross-entropy (classification) or mean squared error (regression) on the probe;
- ``ece``: expected calibration error with 10 equal-width confidence bins: confidence = max
  softmax probability, bin b = (b/10, (b+1)/10] for b = 0..9 (a confidence of exactly 0 cannot
  occur with 10 classes), ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over the
  non-empty bins, computed in float64;
- ``r2``: 1 - SSE / SST on the probe targets, SST around the probe targets' mean (pooled over
  output dimensions); higher is better. ``loss`` and ``ece`` are lower-is-better.

Tasks:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download), split by a
    FIXED permutation (numpy PCG64 seed ``DATA_SEED``, independent of the experiment seed):
    1400 train, 397 probe. Pixels /16, then standardised by the train split's scalar mean and
    std. Model ``arch="cnn"`` (default): Conv 1->8 3x3 pad 1, BatchNorm2d, ReLU, MaxPool 2,
    Conv 8->16 3x3 pad 1, BatchNorm2d, ReLU, MaxPool 2, Flatten (64), Dropout(dropout),
    Linear 64->10; ``arch="mlp"``: Flatten, Linear 64->128, BatchNorm1d, ReLU, Dropout,
    Linear 128->10. Augmentation: gaussian pixel noise of std ``noise`` (standardised units).
    Optimizers: ``"sgd"`` (memstate.optim.SGD, momentum 0.9, lr 0.05) or ``"adamw"``
    (memstate.optim.AdamW, lr 3e-3, betas (0.9, 0.999), weight decay 0.01; at 2e-3 the CNN
    still underfits after 100 steps: accuracy 0.93, ECE 0.19); ``momentum`` applies
    to SGD only, ``betas`` to AdamW only; ``lr=None`` / ``weight_decay=None`` mean the
    optimizer's default (SGD weight decay 0). Metrics accuracy, loss, ece.
    ``phases="split"`` (with ``boundary`` = 60, ``head`` = "same" | "fresh"): steps before
    ``boundary`` train on the batch's examples of classes 0-4, later steps on those of 5-9
    (``phases``: pretrain / finetune); ``head="fresh"`` redraws the classifier from
    ``contract.generator("init", 2)`` at the start of the boundary step; the probe is the
    probe examples of classes 5-9, plus the metric ``pretrain_accuracy`` on those of 0-4.
    ``ema_decay=<float>`` adds ``extra["ema"]`` (a weight-averaged copy of the model, also its
    BatchNorm statistics, updated after every step) and ``extra["ema_decay"]`` (0-d float64),
    and the metrics ema_accuracy, ema_loss, ema_ece of the shadow, so ``reset_ema`` has an
    observable.
``teacher``
    teacher-student regression: a FIXED random teacher MLP (in_dim 16 -> 64 tanh -> 64 tanh ->
    1, weights N(0, 1/fan_in), from ``DATA_SEED``, the same for every experiment seed)
    labels x ~ N(0, I): y = teacher(x) + 0.1 * N(0, 1) noise (relative to the teacher output's
    std), standardised; 2048 train, 512 probe examples, fixed. Student: Linear 16->64,
    BatchNorm1d (``bn=True``), ReLU, Linear 64->64, BatchNorm1d, ReLU, Linear 64->1; SGD momentum
    0.9, lr 0.02 (or AdamW lr 2e-3). Augmentation: gaussian input noise of std ``noise``.
    Metrics loss (MSE) and r2; ``predictions`` are the outputs. ``ema_decay`` as for digits
    (ema_loss, ema_r2).
``ema_queue``
    MoCo-style auxiliary state on the digits data: the student (the digits CNN/MLP plus a
    linear projector features -> ``embed_dim``) is trained with cross-entropy +
    ``contrastive_weight`` * InfoNCE (temperature ``temperature``): query = the normalised
    student embedding of view 1, positive = the normalised teacher embedding of view 2 of the
    same example, negatives = the ``queue_size`` rows of the queue. Both views are the batch
    plus independent gaussian noise, drawn in that order from the step's augment generator.
    ``extra["teacher"]``: an EMA copy of the student (parameters and float buffers lerped with
    weight 1 - decay, integer buffers copied), always in eval mode (so its forward neither uses
    dropout nor changes its BatchNorm statistics; it changes only through the EMA update);
    ``extra["teacher_decay"]``: 0-d float64 (default 0.95: half-life 13.5 steps, so the default
    S5 window 2h = 28 steps fits the default horizon; 0.99 would need 139 steps);
    ``extra["teacher_frozen"]``: 0-d bool (False), created at build so snapshots cover it;
    ``extra["queue"]``: float32 ``[queue_size, embed_dim]``, initialised with normalised gaussian
    rows from ``contract.generator("init", 1)``; ``extra["queue_ptr"]``: 0-d int64. Every step
    enqueues the batch's teacher keys FIFO at rows (ptr + i) mod K and advances ptr by the batch
    size mod K (so one turnover is ceil(K / batch_size) steps, the default ``flush_queue``
    window); the queue is written also while the teacher is frozen (it is a separate source).
    Metrics: accuracy, loss (probe cross-entropy only, no contrastive term) and ece of the
    STUDENT, plus teacher_accuracy, teacher_loss and teacher_ece of the teacher (where S5
    perturbations act directly). ``predictions``: the student's class ids.

Options common to every task (``Task.defaults`` lists each task's): ``optimizer`` ("sgd" or
"adamw"), ``lr``, ``momentum``, ``betas``, ``weight_decay``, ``batch_size`` (64), ``policy``
(an ``OrderSampler`` policy, "rr"), ``noise`` (augmentation std), ``horizon`` (100 steps).

Every tensor in ``extra`` is updated in place (identity kept), as the perturbation primitives
and snapshots require. Decays are 0-d float64 tensors: ``float(t)`` is the Python float given.

Determinism: bitwise for a given device and torch thread count (CPU float reductions depend on
the number of intra-op threads: 1 and 2 threads differ at ~1e-7 after 100 steps). On small
shared CPUs ``torch.set_num_threads(1)`` is also much faster (the tensors are tiny).
"""
from __future__ import annotations

import copy
import math
import os
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from memstate import optim as _optim
from memstate.data import POLICIES, OrderSampler
from memstate.perturb import TrainState, teacher_frozen
from memstate.rng import RngContract

__all__ = ["Task", "TaskImportError", "load", "import_task_class", "import_path", "task_source", "source_hash",
           "DigitsTask", "TeacherTask", "EmaQueueTask", "names", "get", "expected_calibration_error",
           "DATA_SEED"]

DATA_SEED = 20240601
"""Seed of every task's fixed data (split permutation, teacher network, synthetic inputs)."""

ECE_BINS = 10


# ----------------------------------------------------------------------------------- metrics
def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width confidence bins (b/bins, (b+1)/bins], float64 (see module doc)."""
    probs = torch.softmax(logits.detach().to(torch.float64), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels.to(pred.device)).to(torch.float64)
    idx = (torch.ceil(conf * bins).to(torch.int64) - 1).clamp_(0, bins - 1)
    n = conf.numel()
    count = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    return float((sum_acc - sum_conf).abs().sum().item() / n)


def _classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    return {
        "accuracy": float((logits.argmax(dim=1) == labels).to(torch.float64).mean().item()),
        "loss": float(F.cross_entropy(logits, labels).item()),
        "ece": expected_calibration_error(logits, labels),
    }


def _regression_metrics(out: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    out64, y64 = out.detach().to(torch.float64).reshape(y.shape), y.to(torch.float64)
    sse = ((out64 - y64) ** 2).sum()
    sst = ((y64 - y64.mean(dim=0)) ** 2).sum()
    return {"loss": float((sse / y64.numel()).item()), "r2": float((1.0 - sse / sst).item())}


# ----------------------------------------------------------------------------------- helpers
def _init_weights(model: nn.Module, g: torch.Generator) -> None:
    """torch's default init of conv/linear layers, drawn from ``g`` in module order."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
                if m.bias is not None:
                    fan_in = m.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(m.bias, -bound, bound, generator=g)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()


def _shadow(model: nn.Module) -> nn.Module:
    """A frozen (no grad), eval-mode deep copy of ``model`` (EMA shadow / teacher)."""
    s = copy.deepcopy(model)
    s.requires_grad_(False)
    s.eval()
    return s


@torch.no_grad()
def _ema_update(shadow: nn.Module, model: nn.Module, decay: float) -> None:
    """shadow := decay * shadow + (1 - decay) * model, in place; integer buffers are copied."""
    w = 1.0 - decay
    sp, mp = list(shadow.parameters()), list(model.parameters())
    if sp:
        torch._foreach_lerp_(sp, [p.detach() for p in mp], w)
    for bs, bm in zip(shadow.buffers(), model.buffers()):
        if bs.is_floating_point():
            bs.lerp_(bm, w)
        else:
            bs.copy_(bm)


def _decay_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64)


_WARM = False


def _warm_up() -> None:
    """Constructs one throwaway optimizer, once per process, in a helper thread.

    The first ``torch.optim.Optimizer.__init__`` of a process lazily imports torch's compile
    machinery, and that import leaves every frame then on the stack in a reference cycle. Were
    ``build`` (or its caller) on that stack, the first state built, its ``RngContract``
    included, would outlive its last reference until the cyclic garbage collector runs, at an
    arbitrary later time; a ``Snapshot`` captured meanwhile would record that contract, and its
    ``restore()`` would fail once the collector had run. A fresh thread's stack holds nothing."""
    global _WARM
    if not _WARM:
        import threading

        th = threading.Thread(target=lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                              name="memstate.tasks-warm-up")
        th.start()
        th.join()
        _WARM = True


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_step(step: Any) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__} ({step!r})")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


class _Eval:
    """Context: every module given in eval mode, no grad; the train flags are restored after."""

    def __init__(self, *modules: nn.Module):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.flags = [[(sub, sub.training) for sub in m.modules()] for m in self.modules]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        for m in self.modules:
            m.eval()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        for flags in self.flags:
            for sub, flag in flags:
                sub.training = flag
        return False


# ----------------------------------------------------------------------------------- data
_DIGITS_CACHE: Dict[str, Dict[str, torch.Tensor]] = {}
_TEACHER_CACHE: Dict[Tuple, Dict[str, torch.Tensor]] = {}

DIGITS_TRAIN = 1400


def _digits_cpu() -> Dict[str, torch.Tensor]:
    """The fixed digits split on the CPU (built once per process; independent of any RNG state)."""
    d = _DIGITS_CACHE.get("cpu")
    if d is None:
        from sklearn.datasets import load_digits

        raw = load_digits()
        x = np.asarray(raw.data, dtype=np.float64) / 16.0  # [1797, 64], in [0, 1]
        y = np.asarray(raw.target, dtype=np.int64)
        perm = np.random.Generator(np.random.PCG64(DATA_SEED)).permutation(len(y))
        tr, pr = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
        mean, std = x[tr].mean(), x[tr].std()
        x = ((x - mean) / std).astype(np.float32).reshape(-1, 1, 8, 8)
        d = {"x_train": torch.from_numpy(np.ascontiguousarray(x[tr])), "y_train": torch.from_numpy(y[tr]),
             "x_probe": torch.from_numpy(np.ascontiguousarray(x[pr])), "y_probe": torch.from_numpy(y[pr]),
             "train_index": torch.from_numpy(tr.astype(np.int64)), "probe_index": torch.from_numpy(pr.astype(np.int64))}
        _DIGITS_CACHE["cpu"] = d
    return d


def _on(cache: Dict, key, cpu: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    d = cache.get(key)
    if d is None:
        d = {k: v.to(device) for k, v in cpu.items()}
        cache[key] = d
    return d


def _teacher_data_cpu(in_dim: int, hidden: int, out_dim: int, n_train: int, n_probe: int,
                      label_noise: float) -> Dict[str, torch.Tensor]:
    key = ("cpu", in_dim, hidden, out_dim, n_train, n_probe, label_noise)
    d = _TEACHER_CACHE.get(key)
    if d is None:
        rs = np.random.Generator(np.random.PCG64(DATA_SEED))
        w1 = rs.standard_normal((in_dim, hidden)) / math.sqrt(in_dim)
        b1 = 0.1 * rs.standard_normal(hidden)
        w2 = rs.standard_normal((hidden, hidden)) / math.sqrt(hidden)
        b2 = 0.1 * rs.standard_normal(hidden)
        w3 = rs.standard_normal((hidden, out_dim)) / math.sqrt(hidden)
        n = n_train + n_probe
        x = rs.standard_normal((n, in_dim))
        f = np.tanh(np.tanh(x @ w1 + b1) @ w2 + b2) @ w3  # the teacher, in float64
        y = f + label_noise * f.std(axis=0) * rs.standard_normal(f.shape)
        y = (y - y[:n_train].mean(axis=0)) / y[:n_train].std(axis=0)
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        d = {"x_train": torch.from_numpy(np.ascontiguousarray(x32[:n_train])),
             "y_train": torch.from_numpy(np.ascontiguousarray(y32[:n_train])),
             "x_probe": torch.from_numpy(np.ascontiguousarray(x32[n_train:])),
             "y_probe": torch.from_numpy(np.ascontiguousarray(y32[n_train:]))}
        _TEACHER_CACHE[key] = d
    return d


# ----------------------------------------------------------------------------------- models
class DigitsNet(nn.Module):
    """Digits classifier: ``features`` (CNN or MLP trunk) -> Dropout -> ``classifier``; with
    ``embed_dim`` also a linear ``projector`` features -> embedding (for ``ema_queue``)."""

    def __init__(self, arch: str = "cnn", dropout: float = 0.25, embed_dim: Optional[int] = None):
        super().__init__()
        if arch == "cnn":
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten())
            width = 64
        elif arch == "mlp":
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU())
            width = 128
        else:
            raise ValueError(f"arch must be 'cnn' or 'mlp', got {arch!r}")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, 10)
        self.projector = nn.Linear(width, embed_dim) if embed_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))

    def forward_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, normalised embedding) in one pass over the trunk."""
        h = self.features(x)
        return self.classifier(self.dropout(h)), F.normalize(self.projector(h), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.features(x)), dim=1)


class StudentMLP(nn.Module):
    """Regression student: Linear in->h, [BN], ReLU, Linear h->h, [BN], ReLU, Linear h->out."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bn: bool = True):
        super().__init__()
        layers: List[nn.Module] = []
        d = in_dim
        for _ in range(2):
            layers += [nn.Linear(d, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------- options
def _v_choice(*choices):
    def check(k, v):
        if v not in choices:
            raise ValueError(f"option {k}={v!r}; valid: {', '.join(map(repr, choices))}")
        return v
    return check


def _v_int(lo: int):
    def check(k, v):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < lo:
            raise ValueError(f"option {k} must be an int >= {lo}, got {v!r}")
        return int(v)
    return check


def _v_float(lo: float = -math.inf, hi: float = math.inf, lo_open=False, hi_open=False, none_ok=False):
    def check(k, v):
        if v is None and none_ok:
            return None
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if ok:
            x = float(v)
            ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"option {k} must be a number in {rng}{' or None' if none_ok else ''}, got {v!r}")
        return float(v)
    return check


def _v_betas(k, v):
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= float(b) < 1.0 for b in v)
    if not ok:
        raise ValueError(f"option {k} must be a pair (beta1, beta2) of numbers in [0, 1), got {v!r}")
    return (float(v[0]), float(v[1]))


def _v_bool(k, v):
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"option {k} must be a bool, got {v!r}")
    return bool(v)


_COMMON: Dict[str, Tuple[Any, Callable]] = {
    "optimizer": ("sgd", _v_choice("sgd", "adamw")),
    "lr": (None, _v_float(0.0, lo_open=True, none_ok=True)),
    "momentum": (0.9, _v_float(0.0, 1.0, hi_open=True)),
    "betas": ((0.9, 0.999), _v_betas),
    "weight_decay": (None, _v_float(0.0, none_ok=True)),
    "batch_size": (64, _v_int(1)),
    "policy": ("rr", _v_choice(*POLICIES)),
    "noise": (0.1, _v_float(0.0)),
    "horizon": (100, _v_int(1)),
}


# ----------------------------------------------------------------------------------- Task
def _v_json(k, v):
    """Options of a user task: any JSON value (they are written to the card and given back on replay)."""
    import json

    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"option {k} must be a JSON value (number, string, bool, null, list, table), "
                         f"got {v!r}") from None
    return v


_HIGHER_SUFFIXES = ("accuracy", "acc", "r2", "auc", "f1")


class Task:
    """A training task: the protocol every experiment, card and replay runs on.

    Subclass it for your own training code (docs/tasks.md). Required: ``build(seed, *,
    device="cpu", name=None) -> TrainState``, ``train_step(state, step) -> float`` and
    ``evaluate(state) -> {metric: float}``. Everything else has a default:

    - ``option_defaults`` (class attribute, name -> JSON default): the options the constructor
      accepts (``Task(**options)``; unknown ones are refused); ``options`` holds the resolved
      values and ``to_json`` records them, so replay rebuilds the same task;
    - ``metrics`` / ``higher_is_better``: declared, or derived from ``evaluate`` on the state
      ``build(0)`` returns (a metric is higher-is-better if its name ends in accuracy, acc, r2,
      auc or f1, unless ``higher_is_better`` says otherwise);
    - ``predictions(state)``: the vector of ``evaluate``'s metrics (float64), so the arm
      disagreement is the mean squared difference of the probe metrics; override it with
      per-example predictions (int64 class ids or float outputs) for a per-example
      disagreement;
    - ``snapshot_sources(state)``: the TrainState's model, optimizer, sampler and the tensor /
      module entries of ``state.extra``;
    - ``horizon``: the ``horizon`` option if there is one, else ``default_horizon``;
    - ``phases``: ``()`` or ``[(name, start, end), ...]`` covering ``0 .. horizon`` in order;
      the data, loss or learning rate may change at a boundary (``boundaries()``: every start
      but the first; ``t0="boundary"`` branches at the first).

    ``new_state`` builds a TrainState the way the built-in tasks do (contract, weights drawn
    from the contract's "init" stream, OrderSampler).
    """

    name: str = ""
    metrics: Tuple[str, ...] = ()
    higher_is_better: Dict[str, bool] = {}
    option_spec: Dict[str, Tuple[Any, Callable]] = {}
    option_defaults: Dict[str, Any] = {}
    default_horizon: int = 100
    phases: Sequence[Tuple[str, int, int]] = ()
    default_lr: Dict[str, float] = {"sgd": 0.05, "adamw": 3e-3}
    default_weight_decay: Dict[str, float] = {"sgd": 0.0, "adamw": 0.01}

    def __init__(self, **options):
        spec = self.option_spec or {k: (d, _v_json) for k, d in self.option_defaults.items()}
        unknown = sorted(set(options) - set(spec))
        if unknown:
            valid = ", ".join(f"{k} (default {d!r})" for k, (d, _) in spec.items()) or "none"
            raise ValueError(f"task {self.name or type(self).__name__!r}: unknown option(s) {', '.join(unknown)}; "
                             f"valid options: {valid}")
        resolved = {}
        for k, (default, check) in spec.items():
            resolved[k] = check(k, options[k]) if (k in options) else default
        if "lr" in resolved and resolved["lr"] is None:
            resolved["lr"] = self.default_lr[resolved["optimizer"]]
        if "weight_decay" in resolved and resolved["weight_decay"] is None:
            resolved["weight_decay"] = self.default_weight_decay[resolved["optimizer"]]
        self.options: Dict[str, Any] = resolved
        if not self.name:
            self.name = type(self).__name__
        self.metrics, self.higher_is_better = self._metric_spec()

    @property
    def defaults(self) -> Dict[str, Any]:
        return {k: d for k, (d, _) in self.option_spec.items()} if self.option_spec else dict(self.option_defaults)

    @property
    def horizon(self) -> int:
        """Default number of training steps of a run."""
        return int(self.options.get("horizon", self.default_horizon))

    def boundaries(self) -> List[int]:
        """Steps at which a new phase starts (every phase start but the first)."""
        return [int(start) for _, start, _ in list(self.phases)[1:]]

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    def to_json(self) -> Dict[str, Any]:
        return {"task": self.name, "options": dict(self.options), "metrics": list(self.metrics),
                "higher_is_better": dict(self.higher_is_better), "horizon": self.horizon,
                "phases": [list(p) for p in self.phases], "data_seed": DATA_SEED}

    # ------------------------------------------------------------------ the protocol
    def build(self, seed: int, *, device: str = "cpu", name: Optional[str] = None) -> TrainState:
        """A fresh training state at step 0, fully determined by ``seed`` (see the module doc).
        ``name``: the contract's registry name (default ``{task}/seed{seed}/{8 hex}``, unique)."""
        if type(self)._make_model is Task._make_model:
            raise NotImplementedError(f"{type(self).__name__} must implement build(seed, *, device, name)")
        n_train = int(self._data(torch.device(device))["y_train"].shape[0])
        return self.new_state(seed, self._make_model, self._make_optimizer, n_train, device=device, name=name,
                              batch_size=self.options["batch_size"], policy=self.options["policy"],
                              extra=self._make_extra)

    def train_step(self, state: TrainState, step: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement train_step(state, step) -> loss")

    def evaluate(self, state: TrainState) -> Dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate(state) -> {{metric: value}}")

    def predictions(self, state: TrainState) -> torch.Tensor:
        """Default: the probe metrics as a float64 vector (in ``metrics`` order)."""
        m = self.evaluate(state)
        return torch.tensor([float(m[k]) for k in self.metrics], dtype=torch.float64)

    def snapshot_sources(self, state: TrainState) -> Dict[str, Any]:
        """Keyword arguments for ``memstate.Snapshot.capture`` covering the whole state."""
        extra = {k: v for k, v in (state.extra or {}).items() if isinstance(v, (torch.Tensor, nn.Module))}
        return {"model": state.model, "optimizer": state.optimizer, "sampler": state.sampler, "extra": extra}

    def new_state(self, seed: int, make_model: Callable[[], nn.Module],
                  make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], n_train: int, *,
                  device="cpu", name: Optional[str] = None, batch_size: int = 64, policy: str = "rr",
                  extra: Optional[Callable[[nn.Module, RngContract, torch.device], Dict[str, Any]]] = None
                  ) -> TrainState:
        """A TrainState at step 0 determined by ``seed``: ``RngContract(seed, name=...)``,
        ``make_model()`` constructed under ``torch.random.fork_rng`` (the global RNG does not
        move), conv/linear weights drawn from ``contract.generator("init")`` on the CPU, moved
        to ``device``, ``make_optimizer(model)``, ``OrderSampler(n_train, batch_size, policy)``
        on the contract, and ``extra(model, contract, device)`` (default ``{}``)."""
        _warm_up()
        if name is None:
            name = f"{self.name}/seed{seed}/{uuid.uuid4().hex[:8]}"
        contract = RngContract(seed, name=name)
        device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG: keep it out
            model = make_model()
        _init_weights(model, contract.generator("init"))
        model.to(device)
        model.train()
        optimizer = make_optimizer(model)
        sampler = OrderSampler(n_train, batch_size, policy=policy, contract=contract)
        ext = extra(model, contract, device) if extra is not None else {}
        return TrainState(model=model, optimizer=optimizer, sampler=sampler, extra=ext, step=0, contract=contract)

    # ------------------------------------------------------------------ built-in hooks
    def _metric_spec(self) -> Tuple[Tuple[str, ...], Dict[str, bool]]:
        metrics = tuple(self.metrics)
        if not metrics:
            import gc

            state = self.build(0)
            metrics = tuple(self.evaluate(state))
            del state
            gc.collect()  # the throwaway state's RngContract must not outlive this call
        hib = {m: bool(self.higher_is_better.get(m, m.lower().endswith(_HIGHER_SUFFIXES))) for m in metrics}
        return metrics, hib

    def _data(self, device) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _make_model(self) -> nn.Module:
        raise NotImplementedError

    def _make_extra(self, model: nn.Module, contract: RngContract, device: torch.device) -> Dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ shared
    def probe_set(self, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """The fixed probe (inputs, targets), the same for every seed and arm."""
        d = self._data(torch.device(device))
        return d["x_probe"], d["y_probe"]

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.options
        if o["optimizer"] == "sgd":
            return _optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        return _optim.AdamW(model.parameters(), lr=o["lr"], betas=o["betas"], weight_decay=o["weight_decay"])

    def _batch(self, state: TrainState, step: int):
        dev = _device_of(state.model)
        d = self._data(dev)
        ids = state.sampler.batch(step)
        idx = torch.as_tensor(ids, dtype=torch.int64).to(dev)
        return d["x_train"].index_select(0, idx), d["y_train"].index_select(0, idx)

    def _noise(self, g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) * self.options["noise"]

    def _update_ema(self, state: TrainState) -> None:
        ema = state.extra.get("ema")
        if ema is not None:
            _ema_update(ema, state.model, float(state.extra["ema_decay"]))

    def _ema_extra(self, model: nn.Module) -> Dict[str, Any]:
        d = self.options.get("ema_decay")
        return {} if d is None else {"ema": _shadow(model), "ema_decay": _decay_tensor(d)}


class _Supervised(Task):
    """digits and teacher: one forward/backward of the task loss per step, optional EMA."""

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _probe_metrics(self, out: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        raise NotImplementedError

    def _make_extra(self, model, contract, device):
        return self._ema_extra(model)

    def _at_step(self, state: TrainState, step: int) -> None:
        """Called first in every train_step (phase changes of the state happen here)."""

    def train_step(self, state: TrainState, step: int) -> float:
        step = _check_step(step)
        model, opt = state.model, state.optimizer
        self._at_step(state, step)
        x, y = self._batch(state, step)
        if y.shape[0] == 0:  # a phase-split batch with no example of the phase: no update
            state.step = step + 1
            return 0.0
        if self.options["noise"] > 0:
            x = x + self._noise(state.contract.generator("augment", step=step), x)
        model.train()
        opt.zero_grad(set_to_none=True)
        with state.contract.step(step):
            loss = self._loss(model(x), y)
            loss.backward()
        opt.step()
        self._update_ema(state)
        state.step = step + 1
        return float(loss.detach().item())

    def _outputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with _Eval(module):
            return module(x)

    def evaluate_all(self, state: TrainState) -> Dict[str, float]:
        x, y = self.probe_set(_device_of(state.model))
        out = self._probe_metrics(self._outputs(state.model, x), y)
        ema = (state.extra or {}).get("ema")
        if ema is not None and "ema_loss" in self.metrics:
            out.update({f"ema_{k}": v for k, v in self._probe_metrics(self._outputs(ema, x), y).items()})
        return out

    def evaluate(self, state: TrainState) -> Dict[str, float]:
        out = self.evaluate_all(state)
        return {k: out[k] for k in self.metrics}


#: Classes of each phase of ``digits`` with ``phases="split"``.
SPLIT_CLASSES = {"pretrain": (0, 1, 2, 3, 4), "finetune": (5, 6, 7, 8, 9)}


class DigitsTask(_Supervised):
    name = "digits"
    option_spec = {**_COMMON, "arch": ("cnn", _v_choice("cnn", "mlp")),
                   "dropout": (0.25, _v_float(0.0, 1.0, hi_open=True)),
                   "ema_decay": (None, _v_float(0.0, 1.0, lo_open=True, hi_open=True, none_ok=True)),
                   "phases": ("none", _v_choice("none", "split")), "boundary": (60, _v_int(1)),
                   "head": ("same", _v_choice("same", "fresh"))}

    def __init__(self, **options):
        super().__init__(**options)
        if self._split and self.options["boundary"] >= self.horizon:
            raise ValueError(f"option boundary ({self.options['boundary']}) must be before the horizon "
                             f"({self.horizon})")

    @property
    def _split(self) -> bool:
        return self.options.get("phases", "none") == "split"

    @property
    def phases(self):
        """``[("pretrain", 0, boundary), ("finetune", boundary, horizon)]`` with phases="split"."""
        if not self._split:
            return ()
        b = self.options["boundary"]
        return [("pretrain", 0, b), ("finetune", b, self.horizon)]

    def _metric_spec(self):
        m = ("accuracy", "loss", "ece")
        if self.options.get("ema_decay") is not None:
            m = m + ("ema_accuracy", "ema_loss", "ema_ece")
        if self._split:
            m = m + ("pretrain_accuracy",)
        return m, {k: k.endswith("accuracy") for k in m}

    def _data(self, device):
        d = _on(_DIGITS_CACHE, str(torch.device(device)), _digits_cpu(), torch.device(device))
        if self._split and "x_probe_finetune" not in d:
            for phase, classes in SPLIT_CLASSES.items():
                keep = torch.isin(d["y_probe"], torch.tensor(classes, device=d["y_probe"].device))
                d[f"x_probe_{phase}"], d[f"y_probe_{phase}"] = d["x_probe"][keep], d["y_probe"][keep]
        return d

    def probe_set(self, device="cpu"):
        """The fixed probe; with phases="split", its finetune-class (5-9) examples."""
        d = self._data(torch.device(device))
        if self._split:
            return d["x_probe_finetune"], d["y_probe_finetune"]
        return d["x_probe"], d["y_probe"]

    def _batch(self, state, step):
        """The step's batch; with phases="split", only its examples of the phase's classes."""
        x, y = super()._batch(state, step)
        if self._split:
            phase = "pretrain" if step < self.options["boundary"] else "finetune"
            keep = torch.isin(y, torch.tensor(SPLIT_CLASSES[phase], device=y.device))
            x, y = x[keep], y[keep]
        return x, y

    def _at_step(self, state, step):
        """With phases="split" and head="fresh": the classifier is drawn afresh (torch's default
        init from ``contract.generator("init", 2)``) at the start of the boundary step."""
        if self._split and self.options["head"] == "fresh" and step == self.options["boundary"]:
            head = state.model.classifier
            fresh = nn.Linear(head.in_features, head.out_features)
            _init_weights(fresh, state.contract.generator("init", 2))
            with torch.no_grad():
                head.weight.copy_(fresh.weight)
                head.bias.copy_(fresh.bias)

    def evaluate(self, state):
        out = super().evaluate_all(state)
        if self._split:
            d = self._data(_device_of(state.model))
            logits = self._outputs(state.model, d["x_probe_pretrain"])
            out["pretrain_accuracy"] = float((logits.argmax(dim=1) == d["y_probe_pretrain"]).double().mean().item())
        return {k: out[k] for k in self.metrics}

    def _make_model(self):
        return DigitsNet(self.options["arch"], self.options["dropout"])

    def _loss(self, out, y):
        return F.cross_entropy(out, y)

    def _probe_metrics(self, out, y):
        return _classification_metrics(out, y)

    def predictions(self, state: TrainState) -> torch.Tensor:
        x, _ = self.probe_set(_device_of(state.model))
        return self._outputs(state.model, x).argmax(dim=1).cpu()


class TeacherTask(_Supervised):
    name = "teacher"
    default_lr = {"sgd": 0.02, "adamw": 2e-3}
    option_spec = {**_COMMON, "noise": (0.05, _v_float(0.0)),
                   "bn": (True, _v_bool), "in_dim": (16, _v_int(1)), "hidden": (64, _v_int(1)),
                   "teacher_hidden": (64, _v_int(1)), "out_dim": (1, _v_int(1)),
                   "n_train": (2048, _v_int(2)), "n_probe": (512, _v_int(2)),
                   "label_noise": (0.1, _v_float(0.0)),
                   "ema_decay": (None, _v_float(0.0, 1.0, lo_open=True, hi_open=True, none_ok=True))}

    def _metric_spec(self):
        m = ("loss", "r2")
        if self.options["ema_decay"] is not None:
            m = m + ("ema_loss", "ema_r2")
        return m, {k: k.endswith("r2") for k in m}

    def _data(self, device):
        o = self.options
        cpu = _teacher_data_cpu(o["in_dim"], o["teacher_hidden"], o["out_dim"], o["n_train"], o["n_probe"],
                                o["label_noise"])
        key = (str(torch.device(device)), o["in_dim"], o["teacher_hidden"], o["out_dim"], o["n_train"],
               o["n_probe"], o["label_noise"])
        return _on(_TEACHER_CACHE, key, cpu, torch.device(device))

    def _make_model(self):
        o = self.options
        return StudentMLP(o["in_dim"], o["hidden"], o["out_dim"], bn=o["bn"])

    def _loss(self, out, y):
        return F.mse_loss(out, y)

    def _probe_metrics(self, out, y):
        return _regression_metrics(out, y)

    def predictions(self, state: TrainState) -> torch.Tensor:
        x, _ = self.probe_set(_device_of(state.model))
        out = self._outputs(state.model, x).cpu()
        return out.squeeze(1) if out.shape[1] == 1 else out


class EmaQueueTask(DigitsTask):
    name = "ema_queue"
    option_spec = {**{k: v for k, v in DigitsTask.option_spec.items()
                      if k not in ("ema_decay", "phases", "boundary", "head")},
                   "teacher_decay": (0.95, _v_float(0.0, 1.0, lo_open=True, hi_open=True)),
                   "queue_size": (256, _v_int(1)), "embed_dim": (32, _v_int(1)),
                   "temperature": (0.2, _v_float(0.0, lo_open=True)),
                   "contrastive_weight": (0.5, _v_float(0.0))}

    def _metric_spec(self):
        m = ("accuracy", "loss", "ece", "teacher_accuracy", "teacher_loss", "teacher_ece")
        return m, {k: k.endswith("accuracy") for k in m}

    def _make_model(self):
        return DigitsNet(self.options["arch"], self.options["dropout"], embed_dim=self.options["embed_dim"])

    def _make_extra(self, model, contract, device):
        o = self.options
        g = contract.generator("init", 1)
        queue = F.normalize(torch.randn(o["queue_size"], o["embed_dim"], generator=g), dim=1).to(device)
        return {"teacher": _shadow(model), "teacher_decay": _decay_tensor(o["teacher_decay"]),
                "teacher_frozen": torch.tensor(False), "queue": queue.contiguous(),
                "queue_ptr": torch.tensor(0, dtype=torch.int64)}

    def train_step(self, state: TrainState, step: int) -> float:
        step = _check_step(step)
        model, opt, extra = state.model, state.optimizer, state.extra
        teacher, queue, ptr = extra["teacher"], extra["queue"], extra["queue_ptr"]
        x, y = self._batch(state, step)
        g = state.contract.generator("augment", step=step)
        x1 = x + self._noise(g, x)  # student view, then teacher view, from the same generator
        x2 = x + self._noise(g, x)
        model.train()
        teacher.eval()
        opt.zero_grad(set_to_none=True)
        with state.contract.step(step):
            logits, q = model.forward_embed(x1)
            with torch.no_grad():
                k = teacher.embed(x2)
            l_pos = (q * k).sum(dim=1, keepdim=True)
            l_neg = q @ queue.detach().t()
            nce = torch.cat([l_pos, l_neg], dim=1) / self.options["temperature"]
            target = torch.zeros(nce.shape[0], dtype=torch.int64, device=nce.device)
            loss = F.cross_entropy(logits, y) + self.options["contrastive_weight"] * F.cross_entropy(nce, target)
            loss.backward()
        opt.step()
        with torch.no_grad():
            if not teacher_frozen(state):
                _ema_update(teacher, model, float(extra["teacher_decay"]))
            K, b = queue.shape[0], k.shape[0]
            p = int(ptr.item())
            rows = (torch.arange(b, dtype=torch.int64) + p) % K
            if b > K:  # only the last K keys survive a FIFO of length K
                rows, k = rows[-K:], k[-K:]
            queue.index_copy_(0, rows.to(queue.device), k.to(queue.dtype))
            ptr.fill_((p + b) % K)
        state.step = step + 1
        return float(loss.detach().item())

    def evaluate(self, state: TrainState) -> Dict[str, float]:
        x, y = self.probe_set(_device_of(state.model))
        out = self._probe_metrics(self._outputs(state.model, x), y)
        out.update({f"teacher_{k}": v for k, v in
                    self._probe_metrics(self._outputs(state.extra["teacher"], x), y).items()})
        return {k: out[k] for k in self.metrics}


# ----------------------------------------------------------------------------------- registry
_TASKS = {"digits": DigitsTask, "teacher": TeacherTask, "ema_queue": EmaQueueTask}


def names() -> Tuple[str, ...]:
    """Names of the built-in tasks."""
    return tuple(_TASKS)


def get(name: str, **options) -> Task:
    """Task ``name`` configured by ``options``; ValueError listing valid names / options otherwise.
    ``name`` is a built-in name or an import path ``"package.module:Class"`` (see ``load``)."""
    if isinstance(name, str) and ":" in name:
        return load(name, **options)
    cls = _TASKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(_TASKS)}, or an import path "
                         f"'package.module:Class'")
    return cls(**options)


class TaskImportError(ImportError):
    """A user task given by import path could not be imported (one line, naming the path)."""


def import_task_class(spec: str) -> type:
    """The Task subclass named by ``"package.module:Class"`` (``Class`` may be dotted).

    Modules are found like ``python -m`` finds them: the current working directory is put at
    the front of ``sys.path`` (once), then ``sys.path`` and PYTHONPATH as usual. Raises
    TaskImportError with the import error on one line."""
    import importlib
    import sys

    mod_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not mod_name or not attr:
        raise TaskImportError(f"task {spec!r}: expected an import path 'package.module:Class'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - any error while importing user code is reported in one line
        msg = " ".join(str(e).split())
        raise TaskImportError(f"cannot import task {spec!r}: {type(e).__name__}: {msg}") from None
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise TaskImportError(f"task {spec!r} is {obj!r}, not a subclass of memstate.Task")
    return obj


def load(spec: str, **options) -> Task:
    """A task given by import path ``"package.module:Class"``, constructed with ``options``
    (ValueError for a bad option, TaskImportError if it cannot be imported)."""
    cls = import_task_class(spec)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"task {spec!r}: {e}") from None


def import_path(task: Task) -> Optional[str]:
    """``"module:QualName"`` of a task that is not built in (None for the built-in tasks)."""
    cls = type(task)
    if cls in _TASKS.values():
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def task_source(task: Task) -> Optional[Dict[str, Any]]:
    """A user task's import path, resolved options, module source file and the xxh3-128 of
    that file's bytes (None for a built-in task). ``file`` is None (and ``xxh3`` too) when the
    class has no source file. Cards record all but ``file`` (a path of this machine)."""
    import inspect
    import sys

    path = import_path(task)
    if path is None:
        return None
    module = sys.modules.get(type(task).__module__)
    file = None
    try:
        file = inspect.getsourcefile(module) if module is not None else None
    except TypeError:
        file = None
    return {"import_path": path, "options": dict(task.options), "file": file,
            "xxh3": source_hash(file) if file and os.path.isfile(file) else None}


def source_hash(file: str) -> str:
    """xxh3-128 (hex) of a file's bytes."""
    import xxhash

    with open(file, "rb") as f:
        return xxhash.xxh3_128_hexdigest(f.read())
