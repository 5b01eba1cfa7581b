"""Crash consistency of Snapshot.save (issue 10, deliver 3): a process saving over an existing
snapshot again and again is SIGKILLed at random moments; after every kill the directory loads
(every checksum verified) to the last completed or the interrupted snapshot, the next save
succeeds, and no file of the killed save is left behind.

MEMSTATE_CRASH_KILLS sets the number of kills (default 30). The savers are forked from one
helper process that has already imported torch, so each kill costs milliseconds, not an import.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import torch

import memstate
from memstate import Snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = int(os.environ.get("MEMSTATE_CRASH_KILLS", "30"))

SERVER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)  # no OpenMP pool exists before fork()
    sys.path.insert(0, {root!r})
    import memstate
    from memstate import Snapshot
    path, log = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    net = torch.nn.Linear(256, 256)
    opt = memstate.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 256)).sum().backward()
    opt.step()
    print("ready", flush=True)
    for line in sys.stdin:
        gen = int(line)
        pid = os.fork()
        if pid == 0:  # the saver: saves until killed, logging each save's digest before and after
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            i = 0
            while True:
                with torch.no_grad():
                    net.weight.fill_(gen * 100000 + i)
                snap = Snapshot.capture(net, opt, rng=False)
                d = snap.fingerprint().digest
                os.write(fd, f"begin {{d}}\\n".encode())
                snap.save(path)
                os.write(fd, f"done {{d}}\\n".encode())
                i += 1
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("reaped", os.WIFSIGNALED(status) and os.WTERMSIG(status), flush=True)
""")


def test_sigkill_during_saves_leaves_a_valid_snapshot(tmp_path, request):
    path, log = str(tmp_path / "snap"), str(tmp_path / "log")
    torch.manual_seed(1)
    net = torch.nn.Linear(256, 256)
    opt = memstate.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 256)).sum().backward()
    opt.step()
    snap = Snapshot.capture(net, opt, rng=False)
    snap.save(path)
    current = snap.fingerprint().digest
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(root=ROOT), path, log], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0, "interrupted saves": 0, "completed saves": 0}
    try:
        assert server.stdout.readline().strip() == "ready"
        for k in range(KILLS):
            open(log, "w").close()
            server.stdin.write(f"{k}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().split() == ["reaped", str(int(signal.SIGKILL))]
            events = [line.split() for line in open(log).read().splitlines()]
            done = [d for kind, d in events if kind == "done"]
            begun = [d for kind, d in events if kind == "begin"]
            outcomes["completed saves"] += len(done)
            last_done = done[-1] if done else current
            interrupted = begun[-1] if begun and (not done or begun[-1] != done[-1]) else None
            outcomes["interrupted saves"] += interrupted is not None
            loaded = Snapshot.load(path, net, opt, rng=False, hyperparameters="live")  # verifies every checksum
            got = loaded.fingerprint().digest
            assert got in (last_done, interrupted), f"kill {k}: the directory holds neither snapshot"
            outcomes["old" if got == last_done else "new"] += 1
            loaded.restore()
            # the next save succeeds and removes whatever the killed save left
            with torch.no_grad():
                net.weight.fill_(-k)
            snap = Snapshot.capture(net, opt, rng=False)
            snap.save(path)
            current = snap.fingerprint().digest
            names = sorted(os.listdir(path))
            assert len(names) == 3 and names[0] == ".memstate.lock" and names[2] == "manifest.json", names
            assert Snapshot.load(path, net, opt, rng=False, hyperparameters="live").fingerprint().digest == current
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
    line = (f"snapshot crash test: {KILLS} SIGKILLs, {outcomes['completed saves']} completed and "
            f"{outcomes['interrupted saves']} interrupted saves; after the kill the directory held the last "
            f"completed snapshot {outcomes['old']} times, the interrupted one {outcomes['new']} times; 0 invalid")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)
    assert outcomes["interrupted saves"] > 0  # the kills did land inside saves
