"""A training run's save killed with SIGKILL at several moments (issue 16, finding 8): the adapter folder is
either whole (config, weights, loss log and curve) or absent, so the rerun saves it again, and no
`.OUT.*.tmp` folder stays beside it; `train --clean-cache` removes OUT.train."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora
from prompt_cdm.cli import main
from prompt_cdm.training.train import CURVE_NAME, LOG_NAME, is_complete, save_run, work_dir

ROOT = Path(__file__).resolve().parents[2]
# fractions of one save's duration (measured here first): in it and after it; PROMPT_CDM_STRESS=1 (or more)
# adds the start and more points in between (each child costs seconds of imports on a small machine)
KILL_AT = (0.5, 3.0) + ((0.0, 0.2, 0.35, 0.7, 0.9, 1.5) if int(os.environ.get("PROMPT_CDM_STRESS", "0")) else ())
CHILD = r"""
import os, sys, time, pathlib
out, tensors, go = sys.argv[1:4]
from safetensors.torch import load_file
from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig
from prompt_cdm.training.train import save_run, work_dir
import diffusers, matplotlib.pyplot  # imported before the release: the save alone is timed
adapter = LoraAdapter(LoraAdapterConfig(rank=2, alpha=2.0), load_file(tensors))
rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(50)]
out = pathlib.Path(out)
warm = out.parent.parent / f"warm-{os.getpid()}"  # one save first: the timed one runs warm, as the parent's did
save_run(warm / "adapter", warm / "work", adapter, rows, "t", source_id="s", fingerprint="f" * 16, base_model="tiny")
pathlib.Path(f"{go}.ready.{os.getpid()}").touch()
while not os.path.exists(go):
    time.sleep(0.0005)
save_run(out, work_dir(out), adapter, rows, "t", source_id="s", fingerprint="f" * 16, base_model="tiny")
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_a_save_killed_at_any_moment_is_whole_or_absent_and_a_rerun_finishes(pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    fresh = lora.create(pipe, LoraAdapterConfig(rank=2, alpha=2.0))
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    adapter = LoraAdapter(LoraAdapterConfig(rank=2, alpha=2.0), tensors)
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(50)]
    t = time.monotonic()
    save_run(tmp_path / "calibrate" / "adapter", tmp_path / "calibrate" / "work", adapter, rows, "t", source_id="s",
             fingerprint="f" * 16, base_model="tiny")
    save_s = time.monotonic() - t
    outs = [tmp_path / f"run{i}" / "adapter" for i in range(len(KILL_AT))]
    for out in outs:
        work_dir(out).mkdir(parents=True)
        (work_dir(out) / "cache.safetensors").write_bytes(b"latents derived from the data")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(tmp_path / "t.safetensors"), str(go)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out in outs]
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("go.ready.*"))) < len(procs):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    go.touch()
    for p, f in zip(procs, KILL_AT):
        time.sleep(max(0.0, t0 + f * save_s - time.monotonic()))
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)
    states = []
    for out in outs:
        whole = is_complete(out) and (out / LOG_NAME).is_file() and (out / CURVE_NAME).is_file()
        assert whole or not out.exists(), sorted(p.name for p in out.iterdir())  # never half a folder
        states.append(whole)
        if not whole:  # the rerun's save (training itself resumes from OUT.train's checkpoint)
            save_run(out, work_dir(out), adapter, rows, "t", source_id="s", fingerprint="f" * 16, base_model="tiny")
        assert is_complete(out) and (out / CURVE_NAME).is_file()
        assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"] or work_dir(out).exists()
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers
        main(["train", "--clean-cache", "--out", str(out)])
        assert not work_dir(out).exists()
    print(f"one save {save_s:.2f} s; whole after the kill:", states)
