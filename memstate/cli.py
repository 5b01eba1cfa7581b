"""The ``memstate`` command line.

    memstate run [CONFIG.toml] [...]   the default experiment: a seed-paired branch-and-hold
                                       measurement; writes card.json, results.csv, report.html
    memstate replay card.json          re-run a protocol card and verify every fingerprint
    memstate report card.json          regenerate report.html from a card
    memstate verify [--device]         RNG isolation / A-A check on this hardware (+ CPU == CUDA)
    memstate verify --script train.py  run your training script twice with an audit trail, diff them
    memstate diff TRAIL_A TRAIL_B      first step and tensors where two audit trails differ
    memstate info                      versions, build, devices and determinism settings
    memstate demo                      a short tour of fingerprints, optimizers and snapshots

    run and replay also run as ranks of a torchrun launch, the seeds split across them
    (``torchrun --nproc-per-node N -m memstate run CONFIG.toml``, or ``--nproc N``);
    see memstate/distributed/launch.py
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional


def _info_lines() -> List[str]:
    import torch

    from memstate import __version__, _ext
    from memstate import card as _card

    info = _ext.build_info()
    env = _card.environment()  # the CPU as a card records it
    lines = [
        f"memstate        {__version__}",
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"CPU             {env['cpu'] or 'unknown'} (torch CPU kernels {env['torch_cpu_capability'] or 'unknown'}; "
        "cards record both: bitwise replay needs the same CPU kind)",
    ]
    if env["cpu_kernel_env"]:
        lines.append("CPU kernel env  " + " ".join(f"{k}={v}" for k, v in env["cpu_kernel_env"].items()))
    if info.get("built"):
        lines += [
            f"native build    memstate._C {info['version']}, sources {info['source_hash']}, "
            f"built against torch {info['torch_version']}",
            f"CUDA kernels    {'compiled' if info['cuda'] else 'not compiled (CPU-only build)'}",
            f"CPU kernels     ISA {info['cpu_isa']} (supported: {info['cpu_isas']}), "
            f"{torch.get_num_threads()} threads",
        ]
    else:
        lines.append(f"native build    NOT AVAILABLE: {info['error']}")
    from memstate.card import memstate_code
    from memstate.fingerprint import _NATIVE_FINGERPRINT

    lines.append(f"python sources  {memstate_code()['python']} (a resumed run's seed files and torchrun's "
                 "ranks must share them and the native sources)")
    lines.append("Fingerprint     " + ("C type (memstate._fingerprint)" if _NATIVE_FINGERPRINT else
                                       "Python reference class (memstate._fingerprint is not built)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"device cuda:{i}   {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
            )
    else:
        lines.append("devices         cpu only (no CUDA device visible)")
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    lines += [
        f"determinism     torch.use_deterministic_algorithms={det}"
        + (" (warn only)" if det and warn_only else ""),
        f"                cudnn.deterministic={torch.backends.cudnn.deterministic} "
        f"cudnn.benchmark={torch.backends.cudnn.benchmark} "
        f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG', '(unset)')}",
        f"                matmul TF32={torch.backends.cuda.matmul.allow_tf32} "
        f"cudnn TF32={torch.backends.cudnn.allow_tf32}",
    ]
    return lines


def cmd_info(args) -> int:
    print("\n".join(_info_lines()))
    return 0


def cmd_demo(args) -> int:
    import torch

    import memstate
    from memstate import reference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 10))
    w = net[0].weight
    print("msfp1 fingerprints (128-bit, position-keyed, order-free to compute)")
    f = memstate.fingerprint(w)
    print(f"  weight {tuple(w.shape)}              {f.hex()}")
    print(f"  numpy reference agrees            {reference.fingerprint_hex(w) == f.hex()}")
    u = w.detach().clone()
    u.view(-1)[7] = torch.nextafter(u.view(-1)[7], torch.tensor(1e9))
    print(f"  one element moved by one ulp      {memstate.fingerprint(u).hex()}")
    s = w.detach().clone().view(-1)
    s[[0, 1]] = s[[1, 0]]
    print(f"  two elements swapped              {memstate.fingerprint(s).hex()}")
    before = memstate.fingerprint_state(net)
    net.train()
    net(torch.randn(16, 64))  # a forward pass in train mode updates BatchNorm statistics only
    after = memstate.fingerprint_state(net)
    print(f"state digest before a forward pass  {before.digest}")
    print(f"state digest after                  {after.digest}")
    print(f"entries that changed                {', '.join(after.diff(before))}")

    # fused optimizer with in-pass fingerprints, and a snapshot that replays bit for bit
    opt = memstate.optim.AdamW(net.parameters(), lr=1e-2, fingerprint=True)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def train(steps):
        digests = []
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x + 0.1 * torch.randn_like(x)), y).backward()
            opt.step()
            digests.append(opt.state_fingerprint().digest)
        return digests

    train(3)
    print(f"AdamW step, in-pass fingerprints   {len(opt.state_fingerprint())} tensors, digest {opt.state_fingerprint().digest}")
    snap = memstate.Snapshot.capture(net, opt)
    first = train(4)
    snap.restore()
    second = train(4)
    print(f"snapshot {snap.nbytes / 1024:.0f} KiB: 4 steps after restore replay bit for bit: {first == second}")
    return 0 if first == second else 1


#: Keys of a run configuration (TOML file or flags) and their defaults: the main job is the
#: digits task, a momentum reset at step 30 held for its default window, 5 seeds.
RUN_DEFAULTS = {"task": "digits", "perturbation": "reset_momentum", "seeds": 5, "t0": 30, "window": None,
                "horizon": 120, "device": "cpu", "metrics": None, "perturbation_params": {}, "task_options": {},
                "estimand": "treatment", "probe_every": None, "baseline": "butterfly", "aa_check": True,
                "threads": 1}
QUICK = {"seeds": 3, "t0": 8, "horizon": 30}
#: Flags that set a configuration key (``--probe-every`` sets probe_every).
CONFIG_FLAGS = ("task", "perturbation", "seeds", "t0", "window", "horizon", "device", "estimand", "probe_every",
                "baseline", "threads")
#: Files a run writes into its directory (what --force replaces).
RUN_FILES = ("run.json", "card.json", "results.csv", "report.html")
RUN_MARKER = "run.json"


class UsageError(Exception):
    """A user mistake: printed as one line on stderr, exit code 2, nothing created."""


def _run_config(args) -> dict:
    cfg = dict(RUN_DEFAULTS)
    if args.config:
        import tomllib

        try:
            with open(args.config, "rb") as f:
                loaded = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"cannot read {args.config}: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{args.config} is not valid TOML: {e}") from None
        unknown = sorted(set(loaded) - set(RUN_DEFAULTS))
        if unknown:
            raise UsageError(f"unknown key(s) {', '.join(unknown)} in {args.config}; valid: {', '.join(RUN_DEFAULTS)}")
        cfg.update(loaded)
    if args.quick:
        cfg.update(QUICK)
    for key in CONFIG_FLAGS:
        v = getattr(args, key, None)
        if v is not None:
            cfg[key] = v
    if cfg["baseline"] == "none":
        cfg["baseline"] = None
    return cfg


def _explicit_config(args) -> dict:
    """Only the configuration keys the user gave (TOML keys, --quick's, flags), resolved."""
    full = _run_config(args)
    keys = set()
    if args.config:
        import tomllib

        with open(args.config, "rb") as f:  # readable: _run_config above succeeded
            keys |= set(tomllib.load(f))
    if args.quick:
        keys |= set(QUICK)
    keys |= {k for k in CONFIG_FLAGS if getattr(args, k, None) is not None}
    return {k: full[k] for k in keys}


def _experiment(cfg: dict, progress: bool):
    from memstate.experiment import Experiment

    return Experiment(cfg["task"], cfg["perturbation"], t0=cfg["t0"], window=cfg["window"], horizon=cfg["horizon"],
                      seeds=cfg["seeds"], metrics=cfg["metrics"], perturbation_params=cfg["perturbation_params"],
                      task_options=cfg["task_options"], device=cfg["device"], estimand=cfg["estimand"],
                      probe_every=cfg["probe_every"], baseline=cfg["baseline"], aa_check=cfg["aa_check"],
                      threads=cfg["threads"], progress=progress)


def _saved_run(out: str) -> Optional[dict]:
    """The run.json of a run directory (None if there is none); UsageError if unreadable."""
    import json

    path = os.path.join(out, RUN_MARKER)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read().decode("utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError("no config in it")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{path} is unreadable ({e}); use another --out, or --force to replace it") from None
    return saved


def _clear_run(out: str) -> None:
    """Removes what a run writes (RUN_FILES, plots, seeds/) from ``out``; nothing else."""
    import shutil

    for name in os.listdir(out):
        if name in RUN_FILES or (name.endswith(".png") and not os.path.isdir(os.path.join(out, name))):
            os.remove(os.path.join(out, name))
    if os.path.isdir(os.path.join(out, "seeds")):
        shutil.rmtree(os.path.join(out, "seeds"))


def _prepare_run(args):
    """Configuration, experiment and output directory of ``memstate run``; every user mistake
    raises UsageError or ConfigError before anything is created."""
    if args.resume:
        if args.force:
            raise UsageError("--resume continues a run and --force replaces it: give one of them")
        saved = _saved_run(args.resume)
        if saved is None:
            raise UsageError(f"--resume {args.resume}: no run there ({RUN_MARKER} missing)")
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise UsageError("--resume DIR writes into DIR; do not give --out as well")
        cfg = dict(RUN_DEFAULTS)
        cfg.update(saved["config"])
        asked = _explicit_config(args)
        conflicts = sorted(k for k in asked if asked[k] != cfg.get(k))
        if conflicts:
            raise UsageError(f"--resume {args.resume}: the run there has "
                             + ", ".join(f"{k}={cfg.get(k)!r}" for k in conflicts) + "; you asked for "
                             + ", ".join(f"{k}={asked[k]!r}" for k in conflicts)
                             + " (a resumed run keeps its directory's configuration; start a new run with --out)")
        out = args.resume
    else:
        cfg = _run_config(args)
        task_dir = "".join(c if c.isalnum() or c in "_.-" else "-" for c in str(cfg["task"]))
        default = os.path.join("runs", f"{task_dir}-{cfg['perturbation']}" + ("-quick" if args.quick else ""))
        out = args.out or default
    exp = _experiment(cfg, progress=not args.no_progress)
    if not args.resume and os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"{out} exists and is not a directory; choose another with --out")
        saved = _saved_run(out) if not args.force else None
        if os.listdir(out) and not args.force:
            if saved is None:
                raise UsageError(f"{out} is not empty and holds no memstate run; choose another directory with --out, "
                                 f"or --force to write into it")
            if saved.get("config_hash") != exp.config_hash():
                raise UsageError(f"{out} holds a different run ({saved['config'].get('task')} / "
                                 f"{saved['config'].get('perturbation')}, config hash {saved.get('config_hash')}); "
                                 f"choose another directory with --out, or --force to replace it")
    exp.preflight()
    return cfg, exp, out


def _nproc_refused(args, command: str) -> bool:
    """True (after one line on stderr) when ``--nproc`` disagrees with the launch this process
    already runs under (``launch.check_nproc``)."""
    from memstate.distributed import launch

    problem = launch.check_nproc(args.nproc) if args.nproc is not None else None
    if problem:
        print(f"memstate {command}: {problem}", file=sys.stderr)
    return bool(problem)


def _launch_ranks(args, command: str, hint: str = "") -> int:
    """``--nproc N`` outside a launch: runs this same command line as N ranks under torch's
    elastic launcher and returns rank 0's exit code (1, with ``hint``, if a rank failed first)."""
    from memstate.distributed import launch

    code = launch.launch(getattr(args, "argv", sys.argv[1:]), args.nproc)
    if code is None:
        print(f"memstate {command}: a rank failed and the launcher stopped the others" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return 1
    return code


def cmd_run(args) -> int:
    from memstate.distributed import launch
    from memstate.experiment import ConfigError

    if args.cpu_capability:
        from memstate.card import cpu_capability

        try:
            env = _capability_env(args.cpu_capability)
        except UsageError as e:
            print(f"memstate run: --cpu-capability {args.cpu_capability.lower()}: {e}", file=sys.stderr)
            return 2
        why = f"--cpu-capability asks for torch CPU kernels at {args.cpu_capability}, this machine runs " \
              f"{cpu_capability()}"
        code = _rerun_with_kernel_env(args, "run", env, why) if env else None
        if code is not None:
            return code
    if _nproc_refused(args, "run"):
        return 2
    if args.nproc is not None and not launch.launched():
        try:  # usage errors: exit 2 here, before any rank starts
            _, _, out = _prepare_run(args)
        except (UsageError, ConfigError) as e:
            print(f"memstate run: {e}", file=sys.stderr)
            return 2
        return _launch_ranks(args, "run", f"finished seeds are in {out}/seeds; continue with --resume {out}")
    if not launch.launched():
        return _run(args, None)
    with launch.Session() as session:
        code = _run(args, session)
    return code if session.main else 0  # the outcome is rank 0's to report (launch's docstring)


def _run(args, session) -> int:
    """``memstate run`` in this process: alone (``session`` None), or as one rank of a launch,
    running its share of the seeds; rank 0 then writes the card and the report."""
    import json

    from memstate.card import make_card, write_card
    from memstate.distributed import launch
    from memstate.experiment import ConfigError, _atomic_json
    from memstate.report import write_report

    main = session is None or session.main
    error = None
    try:
        cfg, exp, out = _prepare_run(args)
    except (UsageError, ConfigError) as e:
        error = f"memstate run: {e}"
    if session is not None:
        error = session.first_error(error)  # every rank stops if one cannot start
    if error:
        if main:
            print(error, file=sys.stderr)
        return 2
    exp.progress = exp.progress and main
    if main:
        if args.force and os.path.isdir(out):
            _clear_run(out)
        os.makedirs(out, exist_ok=True)
        saved_cfg = {k: cfg[k] for k in RUN_DEFAULTS}
        _atomic_json(os.path.join(out, RUN_MARKER), {"config": saved_cfg, "config_hash": exp.config_hash()})
        print(f"memstate run: {cfg['task']} / {cfg['perturbation']}, t0={cfg['t0']}, "
              f"window={cfg['window'] or 'default'}, horizon={cfg['horizon']}, seeds={exp.seeds} -> {out}"
              + (f" on {session.world} ranks" if session else ""), flush=True)
    if session is not None:
        session.barrier()  # the directory is ready (and cleared, with --force) before a rank writes a seed
    try:
        if session is None:
            result = exp.run(out_dir=out, resume=bool(args.resume))
        else:
            result = launch.run_experiment(exp, out, bool(args.resume), session)
    except ConfigError as e:
        if main:
            print(f"memstate run: {e}", file=sys.stderr)
        return 2
    except launch.RankFailed as e:
        if main:
            print(f"memstate run: {e}\nfinished seeds are in {out}/seeds; continue with --resume {out}",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished seeds are in {out}/seeds; continue with --resume {out}", file=sys.stderr)
        return 130
    if not main:
        return 0
    for point in list(result.tables)[::-1]:
        print(result.table(point))
        print()
    print("A/A check: " + ("bitwise identical at every step" if result.aa_identical else
                           "not run" if result.aa_identical is None else
                           json.dumps([r["aa"] for r in result.records if not r["aa"]["identical"]])))
    if result.violations:
        print("contract violations:\n  " + "\n  ".join(result.violations))
    card = make_card(result)
    write_card(card, os.path.join(out, "card.json"))
    report = write_report(card, out)
    print(f"wrote {out}/card.json, {out}/results.csv, {report}")
    return 0 if (result.aa_identical is not False and not result.violations) else 1


def _parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes a comma-separated list of seeds, e.g. 0,3; got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds needs at least one seed")
    return seeds


def _says_once(args) -> bool:
    """Whether this process prints a replay's notes: rank 0 under torchrun; otherwise a process
    that is not about to launch ranks (--nproc)."""
    from memstate.distributed import launch

    return os.environ.get("RANK") == "0" if launch.launched() else args.nproc is None


def _rerun_with_kernel_env(args, command: str, env: dict, why: str) -> Optional[int]:
    """Re-runs this command in a child process with torch's CPU kernel variables ``env`` set
    (torch reads them once per process) and returns its exit code; None when they are already
    set so (a re-run child, or set by hand): run here."""
    import subprocess

    from memstate.distributed import launch

    if all(os.environ.get(k) == v for k, v in env.items()):
        return None
    setting = " ".join(f"{k}={v}" for k, v in env.items())
    # said once: by rank 0 under torchrun, or by this process (with --nproc, before the launch;
    # the ranks it launches inherit the variables and say nothing about it)
    if not launch.launched() or os.environ.get("RANK") == "0":
        print(f"memstate {command}: running in a child process with {setting}: {why}", flush=True)
    argv = getattr(args, "argv", sys.argv[1:])
    code = subprocess.call([sys.executable, "-m", "memstate"] + list(argv), env=dict(os.environ, **env))
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def _capability_env(target: str) -> dict:
    """cpu_capability_env for this machine; UsageError when it cannot run at ``target``."""
    from memstate.card import cpu_capability, cpu_capability_env

    here = cpu_capability()
    env = cpu_capability_env(target, here) if here else None
    if env is None:
        raise UsageError(f"torch's CPU kernels cannot be run at {target} on this machine (here {here}): a "
                         "capability can only be lowered, on x86")
    return env


def _rerun_at_card_capability(args, card: dict) -> Optional[int]:
    """``memstate replay`` with torch's CPU kernels as the card ran them: its recorded kernel
    variables, and its capability where this machine's is higher (card.card_kernel_env), or
    the capability --cpu-capability names. None: replay here (nothing to change, --cpu-capability
    native, or a capability this machine cannot run at: a NOTE says so)."""
    from memstate.card import card_kernel_env, cpu_capability

    choice, here = args.cpu_capability, cpu_capability()
    if choice == "NATIVE":
        return None
    if choice == "CARD":
        recorded = card["environment"]
        env = card_kernel_env(recorded, here)
        kept = {k: v for k, v in env.items() if k in (recorded.get("cpu_kernel_env") or {})}
        level = recorded.get("torch_cpu_capability") or "a capability it does not record"
        why = (f"the card ran torch's CPU kernels at {level}"
               + (" with " + " ".join(f"{k}={v}" for k, v in kept.items()) if kept else "")
               + f", this machine runs {here} (--cpu-capability native replays with this machine's)")
    else:
        try:
            env = _capability_env(choice)
        except UsageError as e:
            if _says_once(args):
                print(f"memstate replay: NOTE: --cpu-capability {choice.lower()}: {e}; replaying at this machine's")
            return None
        why = f"--cpu-capability asks for torch CPU kernels at {choice}, this machine runs {here}"
    return _rerun_with_kernel_env(args, "replay", env, why) if env else None


def _code_text(code: dict) -> str:
    return f"native sources {code.get('native')}, python sources {code.get('python')}"


def cmd_replay(args) -> int:
    from memstate.card import (CardError, TaskChangedError, cpu_capability, cpu_capability_env,
                               environment_differences, is_user_task, memstate_code, read_card, replay,
                               validate_card)

    try:
        card = read_card(args.card)  # imports nothing
        seeds = _parse_seeds(args.seeds) if args.seeds else None
        missing = [s for s in seeds or () if s not in card["config"]["seeds"]]
        if missing:
            raise UsageError(f"seed(s) {missing} are not in the card (its seeds: {card['config']['seeds']})")
        if is_user_task(card["config"]):
            print(f"memstate replay: importing the card's task {card['config']['task']} (replaying runs its code)")
        try:  # now import the task and check the card's configuration against it
            validate_card(card, args.card, import_task=True)
        except TaskChangedError as e:
            if not args.allow_changed_task:
                raise UsageError(f"{e}; refusing to replay (--allow-changed-task replays it anyway)") from None
            print(f"memstate replay: NOTE: {e}; replaying anyway because of --allow-changed-task")
            validate_card(card, args.card, allow_changed_task=True, import_task=True)
    except (CardError, UsageError) as e:
        print(f"memstate replay: {e}", file=sys.stderr)
        return 2
    from memstate.distributed import launch

    rerun = _rerun_at_card_capability(args, card)
    if rerun is not None:
        return rerun
    # Bitwise replay needs the card's environment (torch build, CPU kind, devices): say up front
    # what differs here, so that a mismatch can be read for what it is.
    env_diff = environment_differences(card["environment"])
    # said once: by rank 0 under torchrun, not by a parent about to launch the ranks
    if env_diff and _says_once(args):
        print("memstate replay: NOTE: this environment differs from the card's; fingerprints are bitwise only "
              "on the same CPU/GPU kind and torch build:\n  " + "\n  ".join(env_diff))
    if _nproc_refused(args, "replay"):
        return 2
    if args.nproc is not None and not launch.launched():
        return _launch_ranks(args, "replay")
    if launch.launched():
        with launch.Session() as session:
            problem = launch.replay(card, session, seeds=seeds, allow_changed_task=args.allow_changed_task)
        if not session.main:
            return 0  # rank 0 reports the outcome
    else:
        problem = replay(card, progress=not args.no_progress, seeds=seeds,
                         allow_changed_task=args.allow_changed_task)
    if problem:
        print(f"memstate replay: FAIL: {problem}")
        code = card["environment"].get("memstate_code")
        if isinstance(code, dict) and code != memstate_code():
            print(f"memstate replay: (the card was made by other memstate code, {_code_text(code)}; here "
                  f"{_code_text(memstate_code())}: a change to memstate that alters results fails here too)")
        if env_diff:
            print("memstate replay: (this environment differs from the card's, see the NOTE above: across CPU "
                  "kinds or torch builds a mismatch is expected and says nothing about the card)")
            if ("torch_cpu_capability" not in card["environment"] and args.cpu_capability == "CARD"
                    and cpu_capability_env("AVX2", cpu_capability())):
                print("memstate replay: (the card does not record torch's CPU kernel capability: if it was made "
                      "on a machine without AVX-512, try --cpu-capability avx2)")
        return 1
    chosen = seeds or card["config"]["seeds"]
    n = sum(len(r["arms"]) for r in card["seeds"] if r["seed"] in chosen)
    print(f"memstate replay: PASS: every recorded fingerprint, loss, probe metric, divergence and disagreement "
          f"matches ({len(chosen)} seeds, {n} arms)")
    if seeds:
        print(f"memstate replay: statistics check SKIPPED (only seeds {','.join(map(str, seeds))} were replayed; "
              f"the tables need all {len(card['config']['seeds'])})")
    else:
        print("memstate replay: PASS: the statistics recomputed from the replayed seeds equal the card's tables")
    return 0


def cmd_report(args) -> int:
    from memstate.card import CardError, read_card
    from memstate.report import write_report

    try:
        card = read_card(args.card)  # a report re-runs nothing and imports nothing the card names
    except CardError as e:
        print(f"memstate report: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(args.card))
    if os.path.isdir(out) and out.lower().endswith((".html", ".htm")):
        print(f"memstate report: {out} is a directory; give a file name or another directory", file=sys.stderr)
        return 2
    print(f"wrote {write_report(card, out)}")
    return 0


def cmd_diff(args) -> int:
    """``memstate diff``: a thin call of ``memstate.audit.main_diff`` (exit 0 identical,
    1 differing, 2 an unreadable trail)."""
    from memstate.audit import main_diff

    return main_diff([args.trail_a, args.trail_b] + (["--plot", args.plot] if args.plot else []))


def cmd_verify(args) -> int:
    import torch

    if args.script is not None:  # a thin call of memstate.audit.main_verify_script (exit 0, 1, 2)
        from memstate.audit import main_verify_script

        if args.device is not None:
            print("memstate verify: --device is for the built-in A/A check; a --script chooses its own device",
                  file=sys.stderr)
            return 2
        forward = ["--script", args.script]
        for flag, value in (("--steps", args.steps), ("--out", args.out), ("--timeout", args.timeout)):
            if value is not None:
                forward += [flag, str(value)]
        return main_verify_script(forward + (["--", *args.script_args] if args.script_args else []))
    if args.steps is not None or args.out is not None or args.timeout is not None or args.script_args:
        print("memstate verify: --steps, --out, --timeout and '-- args' go with --script", file=sys.stderr)
        return 2
    args.device = args.device or "cpu"

    from memstate.experiment import ConfigError, Experiment

    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f" ({detail})" if detail else ""))

    try:
        exp = Experiment("digits", "null", t0=4, window=6, horizon=14, seeds=2, aa_check=True, device=args.device)
    except ConfigError as e:
        print(f"memstate verify: {e}", file=sys.stderr)
        return 2
    result = exp.run()
    for r in result.records:
        c, t = r["arms"]["control"], r["arms"]["treatment"]
        check(f"seed {r['seed']}: hold-window batch ids identical in every arm",
              c["window_hash"] == t["window_hash"] == r["arms"]["aa"]["window_hash"])
        check(f"seed {r['seed']}: null and A/A arms bitwise identical to control at every step",
              r["aa"]["identical"] and max(r["divergence"]["treatment"]["param_l2"]) == 0.0
              and c["digests"] == t["digests"])
        check(f"seed {r['seed']}: RNG streams identical", not r["contract_violations"],
              "; ".join(r["contract_violations"]))
    if torch.cuda.is_available():
        import memstate

        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(n, generator=g) for n in (1, 1000, 70_001)]
        grads = [[torch.randn(p.shape, generator=g) for p in ps] for _ in range(20)]
        for name in ("SGD", "Adam", "AdamW"):
            res = []
            for dev in ("cpu", "cuda"):
                params = [torch.nn.Parameter(p.clone().to(dev)) for p in ps]
                kw = {"momentum": 0.9} if name == "SGD" else {}
                opt = getattr(memstate.optim, name)(params, lr=1e-2, **kw)
                for gs in grads:
                    for p, gr in zip(params, gs):
                        p.grad = gr.to(dev)
                    opt.step()
                res.append(memstate.fingerprint_state(opt).digest + memstate.fingerprint_state({"p": {str(i): p for i, p in enumerate(params)}}).digest)
            check(f"{name}: CPU == CUDA bitwise over 20 steps", res[0] == res[1])
    else:
        print("SKIPPED  CPU == CUDA optimizer steps (no CUDA device visible to this torch)")
    ok = all(results)
    print("verify: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo``, else one clear line naming ``what`` was expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _t0(text: str):
    return "boundary" if text == "boundary" else _nonneg_int(text)


NPROC_HELP = ("run on N processes of this machine: starts torch's elastic launcher (torchrun --standalone "
              "--nproc-per-node N), which deals the seeds to the ranks round-robin; rank 0 writes the output. The "
              "same as torchrun --nproc-per-node N -m memstate {} ... (see docs/distributed.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memstate", description="Determinism and training-state audit for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build, devices, determinism settings").set_defaults(func=cmd_info)
    sub.add_parser("demo", help="a short tour of fingerprints, optimizers and snapshots").set_defaults(func=cmd_demo)
    r = sub.add_parser("run", help="run a seed-paired branch-and-hold experiment (default: digits, momentum reset, "
                                   "5 seeds)",
                       description="Runs a seed-paired branch-and-hold experiment and writes card.json, results.csv "
                                   "and report.html. Flags override the TOML config; the TOML keys are: "
                                   + ", ".join(RUN_DEFAULTS) + ".")
    r.add_argument("config", nargs="?", help="a TOML file with any of the keys: " + ", ".join(RUN_DEFAULTS))
    r.add_argument("--task", help="built-in task (digits, teacher or ema_queue; default digits), or the import path "
                                  "'package.module:Class' of a memstate.Task subclass (the current directory is on "
                                  "the import path, as with python -m; see docs/tasks.md)")
    r.add_argument("--perturbation", help="a primitive (memstate.perturb.names()), or A+B / A+B+C for a 2^k "
                                          "factorial design (default reset_momentum)")
    r.add_argument("--estimand", choices=["treatment", "order"],
                   help="treatment: each primitive's own estimand, memory kept minus perturbed (default); order: "
                        "ATE_order = E[M(rr) - M(wr)] (perturbation policy_switch, t0 0, window = horizon)")
    r.add_argument("--seeds", type=_positive_int, help="number of seeds, 0..N-1 (default 5; at least 2)")
    r.add_argument("--t0", type=_t0, help="branch step (default 30), or 'boundary': the task's first phase "
                                          "boundary (e.g. digits with task_options phases='split')")
    r.add_argument("--window", type=_positive_int,
                   help="hold-window length in steps for every factor (default: each primitive's own rule)")
    r.add_argument("--horizon", type=_positive_int, help="total training steps (default 120)")
    r.add_argument("--device", help="cpu or cuda[:N] (default cpu)")
    r.add_argument("--threads", type=_positive_int, help="torch CPU threads, part of the config (default 1)")
    r.add_argument("--probe-every", dest="probe_every", type=_positive_int, metavar="K",
                   help="also evaluate the probe every K steps after t0 (the window's end and the horizon always)")
    r.add_argument("--baseline", choices=["butterfly", "none"],
                   help="chaos-baseline arm: butterfly scales one state tensor by 1 - 2^-20 at t0 (default "
                        "butterfly); none to skip it")
    r.add_argument("--out", help="output directory (default runs/TASK-PERTURBATION, or .../-quick with --quick)")
    r.add_argument("--force", action="store_true",
                   help="replace the run in --out (its card, report, plots and seed files) if it holds another one")
    r.add_argument("--quick", action="store_true",
                   help="3 seeds, t0 8, horizon 30 (about 15 s), written to its own default directory")
    r.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted run in DIR with DIR's saved configuration (flags that differ from "
                        "it are refused)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--nproc", type=_positive_int, metavar="N", help=NPROC_HELP.format("run"))
    r.add_argument("--cpu-capability", type=str.upper, choices=["DEFAULT", "AVX2"], metavar="{default,avx2}",
                   help="run torch's CPU kernels at this capability (re-runs the command in a child process with "
                        "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS capped; the card "
                        "records it): avx2 on an AVX-512 machine makes a card that AVX2 machines can replay. "
                        "--resume needs it again")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("replay", help="re-run a protocol card and verify everything it records (exit 0 all match, "
                                       "1 a mismatch, 2 an unreadable or invalid card)")
    rp.add_argument("card", help="path of a card.json")
    rp.add_argument("--allow-changed-task", action="store_true",
                    help="replay even if the user task's source file changed since the card was written (the "
                         "output says so); without it that is refused with exit 2")
    rp.add_argument("--seeds", metavar="S,S", help="replay only these seeds, e.g. 0,3 (skips the statistics check)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.add_argument("--nproc", type=_positive_int, metavar="N", help=NPROC_HELP.format("replay"))
    rp.add_argument("--cpu-capability", type=str.upper, default="CARD", choices=["CARD", "NATIVE", "DEFAULT", "AVX2"],
                    metavar="{card,native,default,avx2}",
                    help="torch's CPU kernel code paths for the replay: card (default) runs them as the card "
                         "did, at the capability it records when this machine's is higher and with the kernel "
                         "variables it records as set (by re-running the replay in a child process with "
                         "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ... set); native keeps "
                         "this machine's; default or avx2 asks for that one, e.g. for cards that do not record it")
    rp.set_defaults(func=cmd_replay)
    rr = sub.add_parser("report", help="regenerate report.html, its plots and results.csv from a protocol card")
    rr.add_argument("card", help="path of a card.json")
    rr.add_argument("--out", help="a directory (report.html goes in it) or a file name ending in .html; "
                                  "default: the card's directory")
    rr.set_defaults(func=cmd_report)
    v = sub.add_parser("verify", help="A/A isolation on this hardware, and CPU == CUDA optimizer steps when a GPU is "
                                      "visible; prints PASS, FAIL or SKIPPED per check. With --script: runs your "
                                      "training script twice with an audit trail and diffs the trails",
                       description="Without --script: the built-in A/A isolation check (and CPU == CUDA optimizer "
                                   "steps when a GPU is visible). With --script train.py [--steps N] [-- args...]: "
                                   "runs 'python train.py args' twice in fresh processes, each recording an audit "
                                   "trail (the script calls memstate.audit.auto()), and prints PASS or the first "
                                   "divergence with hints; exit 0 PASS, 1 divergence, 2 a run failed. "
                                   "See docs/audit.md.")
    v.add_argument("--device", default=None, help="device for the A/A check: cpu or cuda[:N] (default cpu)")
    v.add_argument("--script", metavar="TRAIN.py", help="your training script (it calls memstate.audit.auto())")
    v.add_argument("--steps", type=_positive_int, metavar="N", help="with --script: record only the first N steps")
    v.add_argument("--out", metavar="DIR", help="with --script: keep the two trails in DIR (default: a temporary "
                                                "directory)")
    v.add_argument("--timeout", type=float, metavar="S", help="with --script: seconds per run")
    v.set_defaults(func=cmd_verify, script_args=[])
    d = sub.add_parser("diff", help="compare two audit trails: the first differing step, its tensors (grad -> "
                                    "optimizer state -> param -> buffers) and whether the inputs differed; exit 0 "
                                    "identical, 1 differing, 2 an unreadable trail",
                       description="Compares two memstate audit trails (memstate.audit.Trail) step by step. "
                                   "See docs/audit.md.")
    d.add_argument("trail_a", metavar="TRAIL_A", help="an audit trail file")
    d.add_argument("trail_b", metavar="TRAIL_B", help="another audit trail file")
    d.add_argument("--plot", metavar="OUT.png", help="draw the fraction of differing tensors per step")
    d.set_defaults(func=cmd_diff)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: List[str] = []
    if argv[:1] == ["verify"] and "--" in argv:  # memstate verify --script train.py -- args for the script
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.argv = argv  # what --nproc re-runs on each rank
    if script_args:
        args.script_args = script_args
    try:
        return args.func(args)
    except ImportError as e:
        print(f"memstate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
