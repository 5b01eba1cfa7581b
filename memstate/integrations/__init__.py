"""Callbacks that record a memstate audit trail from the training frameworks users already run.

- ``memstate.integrations.lightning.MemstateCallback``: a Lightning ``Callback`` (``lightning``
  or ``pytorch_lightning``, whichever is installed; ``pip install memstate[lightning]``);
- ``memstate.integrations.hf.MemstateTrainerCallback``: a Hugging Face ``transformers``
  ``TrainerCallback`` (``pip install memstate[hf]``).

Each framework is imported only when its callback class is first used, so importing memstate
never needs either.
"""
