"""Fused deterministic optimizers: drop-in for torch.optim, bitwise reproducible (also CPU vs
CUDA), with optional msfp1 fingerprints of every buffer computed in the same pass."""
from memstate.optim._base import FusedOptimizer
from memstate.optim.adagrad import Adagrad
from memstate.optim.adam import Adam, AdamW
from memstate.optim.lamb import LAMB
from memstate.optim.lion import Lion
from memstate.optim.rmsprop import RMSprop
from memstate.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Lion", "LAMB", "FusedOptimizer"]
