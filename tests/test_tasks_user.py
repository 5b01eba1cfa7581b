"""User tasks (issue 13 item 1): memstate.Task with only build/train_step/evaluate, given by
import path to the CLI, TOML and Experiment; cards record the import path, options and source
hash; replay refuses a changed task file (exit 2) unless --allow-changed-task."""
import os
import shutil
import sys

import pytest
import torch

import memstate
from memstate import tasks
from memstate.experiment import ConfigError, Experiment
from cli_helper import run_cli as _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLE = os.path.join(ROOT, "examples", "tasks", "tiny_mlp.py")


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A directory holding a copy of the example task, as the current directory."""
    d = tmp_path / "proj"
    d.mkdir()
    shutil.copy(EXAMPLE, d / "tiny_mlp.py")
    monkeypatch.chdir(d)
    yield d
    sys.modules.pop("tiny_mlp", None)


def test_task_is_exported_and_defaults_are_derived(task_dir):
    assert memstate.Task is tasks.Task

    class Minimal(memstate.Task):  # no metrics declared: derived from evaluate
        def build(self, seed, *, device="cpu", name=None):
            return self.new_state(seed, lambda: torch.nn.Linear(2, 1), lambda m: memstate.optim.SGD(
                m.parameters(), lr=0.1, momentum=0.9), n_train=8, batch_size=4, device=device, name=name)

        def train_step(self, state, step):
            state.step = step + 1
            return 0.0

        def evaluate(self, state):
            w = state.model.weight.detach()
            return {"val_accuracy": float(w.sum()), "loss": float(w.abs().sum())}

    t = Minimal()
    assert t.metrics == ("val_accuracy", "loss")
    assert t.higher_is_better == {"val_accuracy": True, "loss": False}
    s = t.build(3)
    w = s.model.weight.detach()
    assert t.predictions(s).tolist() == [float(w.sum()), float(w.abs().sum())]
    assert set(t.snapshot_sources(s)) == {"model", "optimizer", "sampler", "extra"}
    with pytest.raises(ValueError, match="unknown option"):
        Minimal(hidden=3)
    with pytest.raises(NotImplementedError, match="build"):
        type("NoBuild", (memstate.Task,), {"metrics": ("a",)})().build(0)


def test_import_path_experiment_records_source(task_dir):
    exp = Experiment("tiny_mlp:TinyMLP", "reset_momentum", t0=2, horizon=6, seeds=2, window=2,
                     task_options={"hidden": 8})
    cfg = exp.config()
    assert cfg["task"] == "tiny_mlp:TinyMLP"
    src = cfg["task_source"]
    assert src["import_path"] == "tiny_mlp:TinyMLP"
    assert src["options"] == {"hidden": 8, "lr": 0.1, "momentum": 0.9, "batch_size": 32}
    assert src["xxh3"] == tasks.source_hash(str(task_dir / "tiny_mlp.py"))
    # a Task object of an importable class is recorded by its import path too
    obj = exp.task
    exp2 = Experiment(obj, "reset_momentum", t0=2, horizon=6, seeds=2, window=2)
    assert exp2.config()["task"] == "tiny_mlp:TinyMLP" and exp2.config()["task_options"] == src["options"]
    # built-in tasks record no source
    assert Experiment("digits", "reset_momentum", t0=2, horizon=20, seeds=2).config()["task_source"] is None


@pytest.mark.parametrize("spec, msg", [
    ("no_such_module_xyz:Task", "cannot import task 'no_such_module_xyz:Task': ModuleNotFoundError"),
    ("tiny_mlp:Nope", "AttributeError"),
    ("tiny_mlp:_blobs", "not a subclass of memstate.Task"),
])
def test_bad_import_path_is_a_config_error(task_dir, spec, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        Experiment(spec, "reset_momentum", t0=2, horizon=6, seeds=2)


def test_cli_run_replay_user_task_fresh_process(task_dir):
    (task_dir / "exp.toml").write_text('task = "tiny_mlp:TinyMLP"\nperturbation = "reset_momentum"\nseeds = 2\n'
                                       't0 = 4\nhorizon = 12\nwindow = 3\ntask_options = { hidden = 8 }\n')
    rc, out, err = _cli(["run", "exp.toml", "--out", "run", "--no-progress"], task_dir)
    assert rc == 0, err
    assert "ATE_opt = E[M(carry) - M(reset_momentum)]" in out
    rc, out, err = _cli(["replay", "run/card.json", "--no-progress"], task_dir)
    assert rc == 0, err
    assert "statistics recomputed from the replayed seeds equal" in out
    # the same task from the command line, the module found on PYTHONPATH-less cwd
    rc, out, err = _cli(["run", "--task", "tiny_mlp:TinyMLP", "--t0", "2", "--horizon", "6", "--seeds", "2",
                         "--window", "2", "--out", "run2", "--no-progress", "--baseline", "none"], task_dir)
    assert rc == 0, err
    # a changed task file is refused: exit 2, one line naming the file
    with open(task_dir / "tiny_mlp.py", "a") as f:
        f.write("\n# changed\n")
    rc, out, err = _cli(["replay", "run/card.json", "--no-progress"], task_dir)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert str(task_dir / "tiny_mlp.py") in err and "has changed since the card was written" in err
    assert "--allow-changed-task" in err
    rc, out, err = _cli(["report", "run/card.json", "--out", "rep.html"], task_dir)  # reporting re-runs nothing
    assert rc == 0, err
    rc, out, err = _cli(["replay", "run/card.json", "--no-progress", "--allow-changed-task", "--seeds", "0"], task_dir)
    assert rc == 0, err
    assert "replaying anyway because of --allow-changed-task" in out and "PASS" in out
    # a task that cannot be imported: exit 2, the import error in one line
    os.remove(task_dir / "tiny_mlp.py")
    rc, out, err = _cli(["replay", "run/card.json", "--no-progress"], task_dir)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "ModuleNotFoundError: No module named 'tiny_mlp'" in err
    rc, out, err = _cli(["run", "--task", "tiny_mlp:TinyMLP", "--out", "run3", "--no-progress"], task_dir)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot import task" in err
    assert not os.path.exists(task_dir / "run3")


def test_card_of_a_task_object_replays(task_dir):
    """The issue's defect: a Task subclass ran through the Python API but its card could not be
    replayed (ConfigError 'unknown task'). Now it is recorded by import path and replays."""
    from memstate.card import loads_card, make_card, replay

    TinyMLP = tasks.import_task_class("tiny_mlp:TinyMLP")  # as a user's own import would
    exp = Experiment(TinyMLP(hidden=4), "reset_momentum", t0=2, horizon=6, seeds=2, window=2)
    card = make_card(exp.run())
    import json

    card = loads_card(json.dumps(card).encode(), import_task=True)  # imports the task, checks the source hash
    assert card["config"]["task"] == "tiny_mlp:TinyMLP" and card["config"]["task_options"]["hidden"] == 4
    assert replay(card) is None


# reading a card never runs the code it names


def _card_naming(module_text, task_dir):
    """A real card of the tiny task, then re-pointed (checksum recomputed, as anyone can) at a
    module ``planted`` whose import writes a marker file."""
    import json

    from memstate.card import checksum, make_card

    TinyMLP = tasks.import_task_class("tiny_mlp:TinyMLP")
    card = make_card(Experiment(TinyMLP(hidden=4), "reset_momentum", t0=2, horizon=6, seeds=2, window=2).run())
    (task_dir / "planted.py").write_text(module_text)
    card["config"]["task"] = "planted:TinyMLP"
    card["config"]["task_source"]["import_path"] = "planted:TinyMLP"
    card["card_xxh3_128"] = checksum(card)
    path = task_dir / "card.json"
    path.write_text(json.dumps(card))
    return card, path


PLANTED = "open('IMPORTED', 'w').write('the card ran me')\nfrom tiny_mlp import TinyMLP\n"


def test_reading_and_reporting_a_card_imports_nothing(task_dir):
    """The defect: validating a card constructed its Experiment, which imported the module the
    card names, so `memstate report` (or read_card) of a card someone sent ran their code."""
    from memstate.card import read_card

    card, path = _card_naming(PLANTED, task_dir)
    got = read_card(str(path))
    assert got["config"]["task"] == "planted:TinyMLP"
    assert "planted" not in sys.modules and not (task_dir / "IMPORTED").exists()
    rc, out, err = _cli(["report", "card.json", "--out", "rep.html"], task_dir)
    assert rc == 0, err
    assert (task_dir / "rep.html").exists() and not (task_dir / "IMPORTED").exists()
    # replay does run it (that is what replaying means), and says so first
    rc, out, err = _cli(["replay", "card.json", "--no-progress", "--seeds", "0"], task_dir)
    assert "importing the card's task planted:TinyMLP" in out
    assert (task_dir / "IMPORTED").exists()
    sys.modules.pop("planted", None)


def test_replay_checks_the_config_against_the_imported_task(task_dir):
    """Without importing, read_card takes the task's metric directions from the card; replay
    must then check them against the task before training (a flipped higher_is_better would
    otherwise flip the report's reading of every effect)."""
    import json

    from memstate.card import CardError, checksum, make_card, read_card, replay

    TinyMLP = tasks.import_task_class("tiny_mlp:TinyMLP")
    card = make_card(Experiment(TinyMLP(hidden=4), "reset_momentum", t0=2, horizon=6, seeds=2, window=2).run())
    path = task_dir / "card.json"
    m = card["config"]["metrics"][0]
    card["config"]["higher_is_better"][m] = not card["config"]["higher_is_better"][m]
    card["card_xxh3_128"] = checksum(card)
    path.write_text(json.dumps(card))
    card = read_card(str(path))  # cannot tell without importing the task
    with pytest.raises(CardError, match="config.higher_is_better"):
        replay(card)
    with pytest.raises(CardError, match="config.higher_is_better"):
        read_card(str(path), import_task=True)
    rc, out, err = _cli(["replay", "card.json", "--no-progress"], task_dir)
    assert rc == 2 and "config.higher_is_better" in err


def test_replay_api_refuses_a_changed_task_file(task_dir):
    """The source-hash check lives where the import happens (replay), so a card read without
    importing cannot skip it."""
    from memstate.card import TaskChangedError, make_card, replay, validate_card

    TinyMLP = tasks.import_task_class("tiny_mlp:TinyMLP")
    card = make_card(Experiment(TinyMLP(hidden=4), "reset_momentum", t0=2, horizon=6, seeds=2, window=2).run())
    validate_card(card)
    with open(task_dir / "tiny_mlp.py", "a") as f:
        f.write("\n# changed\n")
    validate_card(card)  # reading imports nothing, so it cannot tell
    with pytest.raises(TaskChangedError, match="has changed since the card was written"):
        replay(card, seeds=[0])
    assert replay(card, seeds=[0], allow_changed_task=True) is None


def test_replay_of_a_user_task_with_tuple_options(task_dir):
    """Found by the distributed replay test: the source identity was compared as Python objects,
    so a task option that is a tuple (DigitsTask's betas) never equalled the card's JSON list and
    every replay of such a task was refused as a config mismatch."""
    import json

    from memstate.card import make_card, read_card, replay

    (task_dir / "tupled.py").write_text("from memstate.tasks import DigitsTask\n\n\nclass Tupled(DigitsTask):\n"
                                        "    pass\n")
    Tupled = tasks.import_task_class("tupled:Tupled")
    exp = Experiment(Tupled(), "reset_momentum", t0=2, horizon=5, seeds=2, window=2, aa_check=False)
    assert isinstance(exp.task.options["betas"], tuple)
    path = task_dir / "card.json"
    path.write_text(json.dumps(make_card(exp.run())))
    assert replay(read_card(str(path)), seeds=[0]) is None
    sys.modules.pop("tupled", None)
