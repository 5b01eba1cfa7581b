"""memstate.integrations: Lightning and transformers callbacks record trails (skipped when the
framework is not installed)."""

import pytest
import torch
from torch import nn

import memstate
from memstate import audit


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_integrations_import_without_frameworks():
    import memstate.integrations.hf as hf
    import memstate.integrations.lightning as lt

    with pytest.raises(AttributeError, match="nope"):
        lt.nope
    with pytest.raises(AttributeError, match="nope"):
        hf.nope


def test_recorder_checks_snapshot_arguments():
    from memstate.integrations._common import Recorder

    with pytest.raises(ValueError, match="snapshot_path"):
        Recorder("x.trail", snapshot_step=3)
    with pytest.raises(ValueError, match="snapshot_step"):
        Recorder("x.trail", snapshot_step=-1, snapshot_path="s")


# ------------------------------------------------------------------------------ Lightning
def _lightning_run(tmp_path, name, steps=4, package="lightning.pytorch", **cb_kw):
    L = pytest.importorskip(package)
    from memstate.integrations.lightning import callback_class

    MemstateCallback = callback_class(L.Callback)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return memstate.optim.Adam(self.parameters(), lr=1e-2, fingerprint=True)

    L.seed_everything(0, verbose=False)
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(len(y)))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    path = str(tmp_path / f"{name}.trail")
    cb = MemstateCallback(path, batch_ids=lambda b: b[2], **cb_kw)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    module = Tiny()
    trainer.fit(module, loader)
    return path, cb, module


def test_lightning_callback_records_replayable_trail(tmp_path):
    a, cb, module = _lightning_run(tmp_path, "a", snapshot_step=2, snapshot_path=str(tmp_path / "snap"))
    b, _, _ = _lightning_run(tmp_path, "b")
    assert cb.trail.closed
    with audit.TrailReader(a) as r:
        rows = list(r.rows())
        labels = {t.label for t in r.tensors}
        assert r.header["in_pass_fingerprints"] is True and r.header["dataloader"]["num_workers"] == 0
    assert [row.step for row in rows] == [0, 1, 2, 3]
    assert {"param net.0.weight", "grad net.0.weight", "optim net.0.weight.exp_avg",
            "buffer net.1.running_mean"} <= labels
    assert all(row.loss is not None and row.batch_hash for row in rows)
    d = audit.diff(a, b)
    assert d.identical, d.summary()
    # the snapshot holds the state right after step 2, as the trail's row for step 2 does
    snap = memstate.Snapshot.load(str(tmp_path / "snap"), model=module, optimizer=cb.recorder.optimizer)
    index = {t.label: t.index for t in audit.TrailReader(a).tensors}
    for label, name in (("param net.0.weight", "model.net.0.weight"), ("buffer net.1.running_var", "model.net.1.running_var"),
                        ("optim net.0.weight.exp_avg", "optimizer.state.0.exp_avg")):
        assert snap.fingerprint()[name] == rows[2].fingerprint(index[label]), label
        assert snap.fingerprint()[name] != rows[3].fingerprint(index[label]), label


def test_lightning_callback_on_pytorch_lightning(tmp_path):
    a, cb, _ = _lightning_run(tmp_path, "pl", steps=3, package="pytorch_lightning")
    with audit.TrailReader(a) as r:
        assert r.steps() == [0, 1, 2]


def test_default_callback_class_is_a_lightning_callback():
    L = pytest.importorskip("lightning.pytorch")
    from memstate.integrations.lightning import MemstateCallback

    assert issubclass(MemstateCallback, L.Callback)


# ------------------------------------------------------------------------------ transformers
def _hf_run(tmp_path, name, steps=3):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from memstate.integrations.hf import MemstateTrainerCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    transformers.set_seed(0)
    x, y = _data()
    ds = [{"x": x[i], "labels": y[i]} for i in range(len(y))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"out-{name}"), max_steps=steps, per_device_train_batch_size=8, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    path = str(tmp_path / f"{name}.trail")
    cb = MemstateTrainerCallback(path)
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    return path, cb


def test_hf_callback_records_replayable_trail(tmp_path):
    a, cb = _hf_run(tmp_path, "a")
    b, _ = _hf_run(tmp_path, "b")
    assert cb.trail.closed
    with audit.TrailReader(a) as r:
        rows = list(r.rows())
        labels = {t.label for t in r.tensors}
    assert [row.step for row in rows] == [0, 1, 2]
    assert {"param net.0.weight", "optim net.0.weight.exp_avg"} <= labels
    assert audit.diff(a, b).identical
