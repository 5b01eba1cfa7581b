"""memstate run / replay with the seeds split across torchrun ranks (gloo on CPU): the card of a
multi-rank run equals a single-process run's, a dead rank's finished seeds survive and --resume
completes the rest on another world size, replay under torchrun reports once from rank 0.

The launch tests share one small configuration (a digits task that dies on demand, 4 seeds,
a few steps) and its runs (module fixture), so they take a couple of minutes in all."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helper import ROOT, run_cli
from dist_helper import run_ranks
from memstate.cli import main
from memstate.distributed import launch
from memstate.experiment import Experiment
from memstate.tasks import DigitsTask

#: A digits task whose process dies (exit 3) when it starts the seed named by CRASH_SEED, as a
#: rank killed by the OOM killer or a node failure would.
CRASHY = '''import os

from memstate.tasks import DigitsTask


class CrashyDigits(DigitsTask):
    def build(self, seed, *, device="cpu", name=None):
        if str(seed) == os.environ.get("CRASH_SEED"):
            os._exit(3)
        return super().build(seed, device=device, name=name)
'''
CONFIG = '''task = "crashy:CrashyDigits"
perturbation = "reset_momentum"
t0 = 2
horizon = 6
window = 2
seeds = 4
threads = 1
baseline = "none"
device = "{device}"
'''
#: Card fields that differ between two runs of one configuration (time, machine, their checksum).
UNSTABLE = ("created", "environment", "card_xxh3_128")


def _torchrun(nproc, args, cwd, timeout=300):
    """``torchrun --standalone --nproc-per-node NPROC -m memstate ARGS`` on this checkout."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        "-m", "memstate", *args], cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _crash_cli(args, cwd, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRASH_SEED", str(seed))
        return run_cli(args, cwd)


def _masked_card(path):
    """card.json's text with the UNSTABLE fields' values replaced, and its checksum."""
    with open(path) as f:
        raw = f.read()
    card = json.loads(raw)
    assert raw == json.dumps(card, indent=1)  # so comparing re-dumped cards compares the files' bytes
    checksum = card["card_xxh3_128"]
    for k in UNSTABLE:
        card[k] = "-"
    return json.dumps(card, indent=1), checksum


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def assert_same_outputs(ref, other):
    """Every file of two run directories has the same bytes, except card.json's UNSTABLE fields
    and, in report.html, the card checksum (which covers the created time)."""
    assert _files(ref) == _files(other)
    (card_a, sum_a), (card_b, sum_b) = _masked_card(f"{ref}/card.json"), _masked_card(f"{other}/card.json")
    assert card_a == card_b
    for name in _files(ref):
        if name == "card.json":
            continue
        with open(os.path.join(ref, name), "rb") as f:
            a = f.read()
        with open(os.path.join(other, name), "rb") as f:
            b = f.read()
        if name == "report.html":
            assert a.count(sum_a.encode()) == 1 and b.count(sum_b.encode()) == 1
            a, b = a.replace(sum_a.encode(), b"-"), b.replace(sum_b.encode(), b"-")
        assert a == b, f"{name} differs between {ref} and {other}"


def _rank_lines(out):
    return sorted(line for line in out.splitlines() if line.startswith("[rank "))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A directory with the crashy task and its config, and the single-process run ``ref`` of it."""
    d = tmp_path_factory.mktemp("distrun")
    (d / "crashy.py").write_text(CRASHY)
    (d / "cfg.toml").write_text(CONFIG.format(device="cpu"))
    cwd = os.getcwd()
    os.chdir(d)  # the task is imported from the current directory, as with python -m
    try:
        assert main(["run", "cfg.toml", "--out", "ref", "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
        sys.modules.pop("crashy", None)
    return str(d)


# ------------------------------------------------------------------------------------ rules


def test_seeds_are_dealt_round_robin():
    seeds = [5, 9, 2, 7, 11, 3, 8]
    parts = [launch.assign(seeds, r, 3) for r in range(3)]
    assert parts == [[5, 7, 8], [9, 11], [2, 3]]
    assert sorted(sum(parts, [])) == sorted(seeds)
    assert [launch.assign([1, 2], r, 4) for r in range(4)] == [[1], [2], [], []]


def test_rank_device_is_local_rank_under_a_launcher(monkeypatch):
    assert launch.rank_device("cuda") == "cuda" and launch.rank_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.rank_device("cuda") == "cuda:1" and launch.rank_device("cuda:0") == "cuda:1"
    assert launch.rank_device("cpu") == "cpu"


def test_nproc_that_disagrees_with_the_launch_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(k, v)
    assert main(["run", "--seeds", "2", "--nproc", "3", "--out", "x", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--nproc 3 starts torchrun, but this process already runs under a launcher with 2" in err
    assert os.listdir(tmp_path) == []


def test_replay_nproc_with_an_invalid_card_exits_2_before_launching(tmp_path, capsys):
    (tmp_path / "card.json").write_text("{not json")
    assert main(["replay", str(tmp_path / "card.json"), "--nproc", "2"]) == 2
    out, err = capsys.readouterr()
    assert "malformed JSON" in err and "[rank" not in out


class _RaisingDigits(DigitsTask):
    def build(self, seed, *, device="cpu", name=None):
        if seed == 1:
            raise ValueError("planted failure in seed 1")
        return super().build(seed, device=device, name=name)


def _run_with_a_raising_rank(rank, world, out_dir):
    exp = Experiment(_RaisingDigits(), "reset_momentum", t0=2, horizon=4, window=2, seeds=[0, 1])
    with launch.Session() as session:
        try:
            launch.run_experiment(exp, out_dir, False, session)
        except launch.RankFailed as e:
            return str(e)
    return None


def _run_with_a_rank_elsewhere(rank, world, out_dir):
    from memstate import experiment

    if rank == 1:  # as if this rank ran on a node of another CPU kind
        real = experiment.replay_environment
        experiment.replay_environment = lambda: dict(real(), cpu="Another CPU (TM)")
    exp = Experiment("digits", "reset_momentum", t0=2, horizon=4, window=2, seeds=[0, 1])
    with launch.Session() as session:
        try:
            launch.run_experiment(exp, out_dir, False, session)
        except experiment.ConfigError as e:
            error = str(e)
        from memstate.card import make_card

        card = make_card(experiment.ExperimentResult(exp.config(), [exp.run_seed(0), exp.run_seed(1)]))
        verdict = launch.replay(card, session)
    return error, verdict


def test_ranks_in_different_environments_refuse_to_make_or_replay_one_card(tmp_path):
    """A launch over nodes of different machine kinds would mix results that no single machine
    can replay (run) or blame a card for another machine's kernels (replay): both refuse."""
    results = run_ranks(_run_with_a_rank_elsewhere, 2, str(tmp_path), timeout=180)
    assert results[0] == results[1], results
    error, verdict = results[0]
    mixed = "rank 1 runs in another environment than rank 0 (cpu: rank 1 'Another CPU (TM)', rank 0 "
    assert error.startswith(mixed) and error.endswith("; one card cannot mix them: launch every rank on the same "
                                                      "machine kind"), error
    assert not os.path.exists(tmp_path / "seeds")  # refused before any seed ran
    assert verdict.startswith(mixed) and verdict.endswith(": replay every seed on one machine kind"), verdict


def test_ranks_running_other_memstate_code_are_a_mismatch():
    """A node with another memstate checkout (a changed .py or native source) is refused like
    another machine kind, naming the code; the same code on every rank is not."""
    import json

    from memstate.experiment import replay_environment

    class Gathered:  # what session.all_gather returns: every rank's text, rank 0 first
        def __init__(self, *envs):
            self.texts = [json.dumps(e, sort_keys=True) for e in envs]

        def all_gather(self, text):
            return self.texts

    here = replay_environment()
    assert launch.environment_mismatch(Gathered(here, here), here) is None
    other = dict(here, memstate_code=dict(here["memstate_code"], python="0" * 16))
    mixed = launch.environment_mismatch(Gathered(here, other), here)
    assert mixed == (f"rank 1 runs in another environment than rank 0 (memstate_code: rank 1 "
                     f"{other['memstate_code']!r}, rank 0 {here['memstate_code']!r})"), mixed


def test_a_rank_that_raises_fails_every_rank_and_keeps_the_others_seeds(tmp_path):
    errors = run_ranks(_run_with_a_raising_rank, 2, str(tmp_path), timeout=180)
    assert errors[0] == errors[1]
    assert errors[0].startswith("rank 1 of 2 failed on its seeds [1]:") and "planted failure in seed 1" in errors[0]
    assert os.listdir(tmp_path / "seeds") == ["seed_0.json"]


# ------------------------------------------------------------------------------------ launches


def test_two_ranks_write_the_single_process_card(runs):
    code, out, err = _torchrun(2, ["run", "cfg.toml", "--out", "two", "--no-progress"], runs)
    assert code == 0, err
    assert _rank_lines(out) == ["[rank 0/2] seeds [0, 2] on cpu", "[rank 1/2] seeds [1, 3] on cpu"]
    assert out.count("A/A check: bitwise identical") == 1 and out.count("wrote two/card.json") == 1
    assert_same_outputs(f"{runs}/ref", f"{runs}/two")


def test_a_dead_rank_keeps_its_seeds_and_resume_finishes_on_three_ranks(runs):
    code, out, err = _crash_cli(["run", "cfg.toml", "--out", "crash", "--no-progress", "--nproc", "2"], runs, seed=3)
    assert code == 1, err
    assert "a rank failed and the launcher stopped the others; finished seeds are in crash/seeds; " \
           "continue with --resume crash" in err
    # finished seeds only: a rank stopped while writing leaves its seed_N.json.tmp (atomic write)
    seeds = [f for f in os.listdir(f"{runs}/crash/seeds") if f.endswith(".json")]
    # rank 1 finished seed 1 and died starting seed 3; rank 0 was stopped during seed 0 or 2 or after
    assert "seed_1.json" in seeds and "seed_3.json" not in seeds and not os.path.exists(f"{runs}/crash/card.json")
    kept = {f: open(f"{runs}/crash/seeds/{f}", "rb").read() for f in seeds}
    mtimes = {f: os.stat(f"{runs}/crash/seeds/{f}").st_mtime_ns for f in seeds}
    code, out, err = _torchrun(3, ["run", "--resume", "crash", "--no-progress"], runs)
    assert code == 0, err
    pending = [s for s in range(4) if f"seed_{s}.json" not in seeds]
    assert _rank_lines(out) == [f"[rank {r}/3] seeds {launch.assign(pending, r, 3)} on cpu"
                                + (f" ({len(seeds)} finished seed(s) reused)" if r == 0 else "") for r in range(3)]
    assert {f: os.stat(f"{runs}/crash/seeds/{f}").st_mtime_ns for f in seeds} == mtimes  # reused, not re-run
    assert {f: open(f"{runs}/crash/seeds/{f}", "rb").read() for f in seeds} == kept
    assert_same_outputs(f"{runs}/ref", f"{runs}/crash")


def test_replay_on_two_ranks_passes_and_rank_0_reports(runs):
    code, out, err = run_cli(["replay", "ref/card.json", "--no-progress", "--nproc", "2"], runs)
    assert code == 0, err
    assert _rank_lines(out) == ["[rank 0/2] replays seeds [0, 2]", "[rank 1/2] replays seeds [1, 3]"]
    assert out.count("PASS: every recorded fingerprint") == 1
    assert out.count("PASS: the statistics recomputed from the replayed seeds equal the card's tables") == 1


def test_replay_under_torchrun_reports_a_mismatch_found_by_another_rank(runs):
    from memstate.card import checksum

    with open(f"{runs}/ref/card.json") as f:
        card = json.load(f)
    card["seeds"][3]["arms"]["control"]["losses"][-1] += 2.0 ** -20
    card["environment"]["cpu"] = "Another CPU (TM)"  # the environment note is said once, by rank 0
    card["card_xxh3_128"] = checksum(card)
    with open(f"{runs}/tampered.json", "w") as f:
        json.dump(card, f, indent=1)
    code, out, err = _torchrun(2, ["replay", "tampered.json", "--seeds", "0,3", "--no-progress"], runs)
    assert code == 1, err
    assert _rank_lines(out) == ["[rank 0/2] replays seeds [0]", "[rank 1/2] replays seeds [3]"]
    assert out.count("memstate replay: FAIL: seed 3, arm control, step 5") == 1, out
    assert out.count("NOTE: this environment differs from the card's") == 1, out
    assert out.count("cpu: card 'Another CPU (TM)', here ") == 1, out
    assert out.count("memstate replay: (this environment differs from the card's") == 1, out


def _lowerable() -> bool:
    from memstate.card import cpu_capability, cpu_capability_env

    return bool(cpu_capability_env("DEFAULT", cpu_capability() or "DEFAULT"))


@pytest.mark.skipif(not _lowerable(), reason="needs an x86 machine whose torch CPU kernels run above DEFAULT")
@pytest.mark.parametrize("how", ["torchrun", "nproc"])
def test_replay_on_ranks_at_the_cards_cpu_capability(runs, how):
    """A card recording lower torch CPU kernels than here's: under torchrun every rank re-runs
    itself at the card's capability (joining the group from its child), with --nproc the parent
    does before launching; either way the ranks replay at it and the line is said once."""
    from memstate.card import checksum, cpu_capability

    with open(f"{runs}/ref/card.json") as f:
        card = json.load(f)
    card["environment"]["torch_cpu_capability"] = "DEFAULT"  # as if made on a machine without AVX2
    card["card_xxh3_128"] = checksum(card)
    with open(f"{runs}/default_{how}.json", "w") as f:
        json.dump(card, f, indent=1)
    args = ["replay", f"default_{how}.json", "--seeds", "0,3", "--no-progress"]
    code, out, err = _torchrun(2, args, runs) if how == "torchrun" else run_cli(args + ["--nproc", "2"], runs)
    assert code in (0, 1), err  # the card was made at this machine's capability: it may well differ
    assert out.count("memstate replay: running in a child process with ATEN_CPU_CAPABILITY=default "
                     "ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2: the card ran torch's CPU kernels at "
                     f"DEFAULT, this machine runs {cpu_capability()}") == 1, out
    assert _rank_lines(out) == ["[rank 0/2] replays seeds [0]", "[rank 1/2] replays seeds [3]"], out
    assert "torch_cpu_capability" not in out, out  # the ranks ran at DEFAULT
    assert out.count("memstate replay: PASS: every") + out.count("memstate replay: FAIL: ") == 1, out


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_ranks_on_two_gpus_write_the_single_gpu_card(tmp_path):
    (tmp_path / "crashy.py").write_text(CRASHY)
    (tmp_path / "cfg.toml").write_text(CONFIG.format(device="cuda"))
    code, _, err = run_cli(["run", "cfg.toml", "--out", "ref", "--no-progress"], tmp_path)
    assert code == 0, err
    code, out, err = _torchrun(2, ["run", "cfg.toml", "--out", "two", "--no-progress"], tmp_path)
    assert code == 0, err
    assert _rank_lines(out) == ["[rank 0/2] seeds [0, 2] on cuda:0", "[rank 1/2] seeds [1, 3] on cuda:1"]
    assert_same_outputs(f"{tmp_path}/ref", f"{tmp_path}/two")
