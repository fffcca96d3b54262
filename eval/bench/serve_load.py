"""Load on `prompt-cdm serve`: requests/s and latency at several concurrencies, nothing lost.

    python -m eval.bench.serve_load --levels 1,4,16 --requests 32 --steps 4 --queue-size 8 --threads 1

This process builds a registry (n LoRA sources with random weights on the `--backbone`, one policy
allowing all, one key), starts `python -m prompt_cdm.cli serve --port 0` as a SECOND process on
loopback, then drives it over HTTP: at each concurrency c, c client threads send `--requests`
POST /v1/generate in all (bounded also by `--max-seconds` per level). A client answered 429 waits
the Retry-After it was given (at most 2 s) before its next request, as a polite client would.
Reported per level: requests answered 200 per second of wall time, p50/p95 latency of those,
and counts sent / 200 / 429 / other / lost (no HTTP answer at all). The server's own counters
(accepted = answered) are read before and after each level as the cross-check that every
accepted request was answered. Numbers depend on the machine: compare levels within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def build_registry(folder: Path, backbone: str, n_sources: int, rank: int = 4) -> str:
    """A registry of n random-weight LoRA sources on `backbone`, policy "bench" = all; returns a key."""
    import torch

    from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora, save_adapter
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.serve.keys import KeyStore
    from prompt_cdm.registry.registry import Registry

    pipe = load_quietly(backbone)
    reg = Registry.create(folder / "registry", backbone, pipe.backbone_fingerprint)
    cfg = LoraAdapterConfig(rank=rank, alpha=float(rank))
    for i in range(n_sources):
        g = torch.Generator().manual_seed(i)
        fresh = lora.create(pipe, cfg)
        weights = LoraAdapter(cfg, {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in fresh.tensors.items()})
        reg.add(f"s{i}", save_adapter(folder / "adapters" / f"s{i}", weights, pipe, source_id=f"s{i}",
                                      data_hash=f"bench-{i}"))
    reg.set_policy("bench", reg.sources)
    return KeyStore(reg.folder).create(policy="bench", note="serve_load")[1]


def start_server(registry: Path, a) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "prompt_cdm.cli", "serve", "--registry", str(registry), "--host", "127.0.0.1",
           "--port", "0", "--queue-size", str(a.queue_size), "--max-steps", str(max(a.steps, 1)),
           "--max-prompts", str(a.prompts), "--timeout", str(a.timeout), "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "serving on http://127.0.0.1:PORT ..."
    if not line.startswith("serving on "):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipes drained
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, line.split()[2]


def _health(client) -> dict:
    return client.get("/v1/health").json()


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when empty."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def drive(url: str, key: str, concurrency: int, n_requests: int, max_seconds: float, body: dict) -> dict:
    """c threads, n requests in all (or until max_seconds): statuses and latencies."""
    import httpx

    lock = threading.Lock()
    sent = [0]
    rows: list[tuple[int, float]] = []  # (status or -1 for no answer, seconds)
    t_end = time.perf_counter() + max_seconds

    def client():
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
            while True:
                with lock:
                    if sent[0] >= n_requests or time.perf_counter() > t_end:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/generate", json=body)
                    status, wait = r.status_code, float(r.headers.get("retry-after", 0) or 0)
                except httpx.HTTPError:
                    status, wait = -1, 0.0
                with lock:
                    rows.append((status, time.perf_counter() - t0))
                if status == 429:
                    time.sleep(min(wait, 2.0))

    with httpx.Client(base_url=url, timeout=30) as h:
        before = _health(h)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = _health(h)
    ok = [s for st, s in rows if st == 200]
    return {
        "concurrency": concurrency, "sent": len(rows), "ok": len(ok),
        "busy_429": sum(st == 429 for st, _ in rows), "other": sum(st not in (200, 429, -1) for st, _ in rows),
        "lost": sum(st == -1 for st, _ in rows), "wall_s": wall, "ok_per_s": len(ok) / wall if wall else 0.0,
        "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95),
        "server_accepted": after["accepted"] - before["accepted"],
        "server_answered": after["answered"] - before["answered"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny", help="the registry's backbone ('tiny' or an SD folder)")
    p.add_argument("--sources", type=int, default=3, help="random LoRA sources composed per request")
    p.add_argument("--levels", default="1,4,16", help="client concurrencies")
    p.add_argument("--requests", type=int, default=32, help="requests per level (bounded)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long per level")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per request")
    p.add_argument("--prompts", type=int, default=1, help="prompts (images) per request")
    p.add_argument("--queue-size", type=int, default=8, help="the server's queue (beyond it: 429)")
    p.add_argument("--timeout", type=float, default=120.0, help="the server's request timeout")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    cmd = "python -m eval.bench.serve_load " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: {cmd}", flush=True)
    body = {"prompt": ["a red circle to the left of a blue square"] * a.prompts, "steps": a.steps, "seed": 0}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        key = build_registry(Path(tmp), a.backbone, a.sources)
        proc, url = start_server(Path(tmp) / "registry", a)
        try:
            import httpx

            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
                assert c.post("/v1/generate", json=body).status_code == 200  # warm-up, not counted
            rows = []
            for level in [int(v) for v in a.levels.split(",")]:
                rows.append(drive(url, key, level, a.requests, a.max_seconds, body))
                print(json.dumps(rows[-1]), flush=True)
            audit = (Path(tmp) / "registry" / "serve" / "audit.jsonl").read_text().count("\n")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\n{a.sources} random LoRA sources on {a.backbone}, {a.steps} steps, {a.prompts} prompt(s)/request, "
          f"server queue {a.queue_size}, worker threads {a.threads}; loopback, client in a second process")
    print("| concurrency | sent | 200 | 429 | other | lost | 200/s | p50 s | p95 s | server accepted = answered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        same = "yes" if r["server_accepted"] == r["server_answered"] == r["sent"] - r["busy_429"] - r["lost"] else "NO"
        print(f"| {r['concurrency']} | {r['sent']} | {r['ok']} | {r['busy_429']} | {r['other']} | {r['lost']} | "
              f"{r['ok_per_s']:.2f} | {fmt(r['p50_s'])} | {fmt(r['p95_s'])} | "
              f"{r['server_accepted']} = {r['server_answered']} ({same}) |")
    print(f"audit log lines: {audit} (warm-up + every 200)")
    result = {"command": cmd, "levels": rows, "audit_lines": audit}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
