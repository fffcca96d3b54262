"""Shared files with real parallel writers and writers killed with SIGKILL (issue 16, findings 1, 2, 8):
parallel `keys create` / `keys revoke` lose nothing, parallel `registry add` lose no source, and an add
or a forget killed at any moment leaves nothing that a rerun trips on (verify is clean after it).

Children are real processes (`python -c`), started together and released at once through a "go" file
after their imports, so their read-modify-writes overlap. Defaults are small (8 writers x 2 rounds, 6
kill timings); PROMPT_CDM_STRESS=N multiplies them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import save_random_adapters
from prompt_cdm.registry.registry import Registry
from prompt_cdm.serve.keys import KeyStore

ROOT = Path(__file__).resolve().parents[2]
STRESS = int(os.environ.get("PROMPT_CDM_STRESS", "1"))
CHILD = r"""
import os, sys, time, pathlib
op, reg, go, *args = sys.argv[1:]
from prompt_cdm.registry.registry import Registry
from prompt_cdm.serve.keys import KeyStore
if op in ("add", "forget"):
    import prompt_cdm.adapters.validate, prompt_cdm.data.sources  # imported before the release: the op alone is timed
pathlib.Path(f"{go}.ready.{os.getpid()}").touch()
while not os.path.exists(go):
    time.sleep(0.0005)
if op == "add":
    Registry(reg).add(args[0], args[1])
elif op == "adds":  # one add per round, each released by go.ROUND, reported by go.ROUND.done.PID
    for r, name in enumerate(args[1:]):
        if r:
            while not os.path.exists(f"{go}.{r}"):
                time.sleep(0.0005)
        Registry(reg).add(name, args[0])
        pathlib.Path(f"{go}.{r}.done.{os.getpid()}").touch()
elif op == "forget":
    Registry(reg).forget(args[0], cache_dir=args[1])
elif op == "create":
    print(KeyStore(reg).create(policy=args[0])[0].id)
elif op == "revoke":
    KeyStore(reg).revoke(args[0])
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _start(jobs, go: Path) -> list[subprocess.Popen]:
    """Start one child per (op, registry, *args); return once every child has imported and waits on `go`."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, op, str(reg), str(go), *map(str, args)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for op, reg, *args in jobs]
    deadline = time.monotonic() + 120
    while len(list(go.parent.glob(go.name + ".ready.*"))) < len(procs):
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].communicate()
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.01)
    return procs


def _finish(procs) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    return save_random_adapters(pipe, tmp_path_factory.mktemp("adapters"))


def test_parallel_key_creates_and_revokes_lose_nothing(pipe, adapters, tmp_path):
    """Finding 1: a revocation that printed "revoked" was overwritten by a concurrent create (1 in 8), and
    3 of 24 keys created in parallel were never stored."""
    reg = Registry.create(tmp_path / "reg", "tiny-random", pipe.backbone_fingerprint)
    reg.add("a", adapters["a"])
    reg.set_policy("p", ["a"])
    store = KeyStore(reg.folder)
    for rnd in range(2 * STRESS):
        victims = [store.create(policy="p")[0].id for _ in range(4)]
        go = tmp_path / f"go{rnd}"
        procs = _start([("revoke", reg.folder, v) for v in victims] + [("create", reg.folder, "p")] * 4, go)
        go.touch()
        made = [o for o in _finish(procs) if o]
        records = {r.id: r for r in KeyStore(reg.folder).records()}
        assert all(not records[v].active for v in victims), "a revocation was lost"
        assert len(made) == 4 and all(records[m].active for m in made), "a created key was lost"
    assert len(KeyStore(reg.folder).records()) == 16 * STRESS


def test_parallel_adds_lose_no_source(pipe, adapters, tmp_path):
    """Finding 2: two parallel `registry add`s both exited 0 and registry.json listed one (3 of 5 trials)."""
    reg = Registry.create(tmp_path / "reg", "tiny-random", pipe.backbone_fingerprint)
    rounds = 2 * STRESS
    go = tmp_path / "go"
    # 8 processes, each adding one source per round (the processes live through the rounds: imports once)
    procs = _start([("adds", reg.folder, adapters["a" if i % 2 else "b"], *[f"s{r}x{i}" for r in range(rounds)])
                    for i in range(8)], go)
    names = []
    for r in range(rounds):
        (go if r == 0 else Path(f"{go}.{r}")).touch()
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob(f"go.{r}.done.*"))) < len(procs):
            dead = [p for p in procs if p.poll() not in (None, 0)]
            assert not dead, dead[0].communicate()
            assert time.monotonic() < deadline, "the adds did not finish"
            time.sleep(0.01)
        names += [f"s{r}x{i}" for i in range(8)]
        assert sorted(Registry(reg.folder).sources) == sorted(names)
    _finish(procs)
    assert Registry(reg.folder).verify() == []


KILL_AFTER_MS = (0, 3, 10, 30)  # from release to SIGKILL: before, during and after the copy / deletion


def _kill_at(jobs, delays, go: Path):
    procs = _start(jobs, go)
    t0 = time.monotonic()
    go.touch()
    for p, d in sorted(zip(procs, delays), key=lambda x: x[1]):
        time.sleep(max(0.0, t0 + d / 1000 - time.monotonic()))
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)


def test_add_killed_at_any_moment_leaves_nothing_a_rerun_trips_on(pipe, adapters, tmp_path):
    """Finding 8: kill -9 of `registry add` left an unregistered adapters/NAME that blocked a rerun."""
    delays = list(KILL_AFTER_MS) * STRESS
    regs = [Registry.create(tmp_path / f"reg{i}", "tiny-random", pipe.backbone_fingerprint) for i in range(len(delays))]
    _kill_at([("add", r.folder, "a", adapters["a"]) for r in regs], delays, tmp_path / "go")
    for r in regs:
        r = Registry(r.folder)
        if "a" not in r.sources:
            r.add("a", adapters["a"])  # the rerun: no leftover blocks it
        assert r.sources == ["a"] and r.verify() == [], r.folder


def test_forget_killed_at_any_moment_finishes_on_a_rerun(pipe, adapters, tmp_path):
    delays = list(KILL_AFTER_MS) * STRESS
    regs = []
    for i in range(len(delays)):
        r = Registry.create(tmp_path / f"reg{i}", "tiny-random", pipe.backbone_fingerprint)
        r.add("a", adapters["a"])
        r.add("c", adapters["c"])
        r.add_router("ratio-c", "ratio", {"w": __import__("torch").zeros(3)}, ["c"])
        r.save_derived("caches/c/latents.safetensors", lambda p: p.write_bytes(b"derived"))
        regs.append(r)
    cache = tmp_path / "user-cache"
    _kill_at([("forget", r.folder, "c", cache) for r in regs], delays, tmp_path / "go")
    for r in regs:
        r = Registry(r.folder)
        if "c" in r.sources or r.verify():
            r.forget("c", cache_dir=cache)  # the rerun finishes the deletion
        assert r.sources == ["a"] and r.verify() == [], (r.folder, r.verify())
        assert [f["name"] for f in r.data["forgotten"]] == ["c"]
