"""The generation worker behind `prompt-cdm serve`: a bounded queue in front of one pipeline.

HTTP-agnostic (serve.py is the FastAPI edge). One worker thread owns the pipeline: it takes jobs
from a bounded queue (full -> `Busy`, the caller answers 429), and for each job, under the locks,
  1. rereads the registry and key file if another process changed them,
  2. checks the key again (revoked while queued -> `Unauthorized`) and its policy (a source forgotten
     or removed from the policy while queued -> `Forbidden`: later requests never see it),
  3. makes the adapters applied to the pipeline equal the registry's sources (unloading forgotten
     ones, loading added ones: `compose.load_sources`),
then composes with its `compose.CDMPipeline` (plan under the locks, then the one sampling loop) and
appends the audit line.

Locks, always taken in this order: `_pipe` (the pipeline and its applied adapters; held for a
whole generation), then `_state` (registry + key store; held only briefly). An admin's `forget`
changes the registry under `_state` at once (new and queued requests are refused from then on),
then waits on `_pipe` for the in-flight generation to finish with what it started with, and
unloads the adapter before it returns.
"""
from __future__ import annotations

import base64
import io
import math
import os
import queue
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..compose.pipeline import CDMPipeline, load_sources
from ..compose.request import ComposeError, ComposeRequest, ProviderError, lambdas_for
from .audit import AUDIT_FILE, AuditLog
from .keys import SERVE_DIR, KeyRecord, KeyStore
from ..registry.registry import REGISTRY_FILE, Registry, RegistryError

# a soft prompt's placeholder typed into a prompt would apply that source without asking for it:
# prompts may not contain anything shaped like one (whether or not such a source exists)
PLACEHOLDER_IN_TEXT = re.compile(r"<[a-z0-9][a-z0-9_.\-]*>", re.IGNORECASE)
PLACEHOLDER_MSG = ("prompts may not contain <...> placeholder words; a soft-prompt source is applied by "
                   "naming it in `sources`")


class ServeError(Exception):
    """A request the service refuses; `status` is the HTTP status the edge answers with."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unauthorized(ServeError):
    status = 401


class Forbidden(ServeError):
    status = 403


class NotFound(ServeError):
    status = 404


class Invalid(ServeError):
    status = 422


class Conflict(ServeError):
    """The registry is not in a state that allows the request (a source that does not load; a forget
    that could not finish): the message says what an admin must do."""

    status = 409


class Expired(ServeError):
    """The request's deadline passed before its generation began."""

    status = 504


class Busy(ServeError):
    """The queue is full; retry after `retry_after` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One generation request, already validated by the edge (types and bounds)."""

    key_id: str
    prompts: list[str]
    sources: list[str] | None = None  # None: every source the key's policy allows
    router: str = "uniform"
    weights: dict[str, float] | None = None
    sparse: bool = False
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    caption_prior: bool = False  # lambda(c) ∝ p_i(c) from the registry's caption statistics
    deadline: float | None = None  # time.monotonic() past which nobody waits for the answer: skip it
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


@dataclass
class _Applied:
    source: object           # compose.Source
    handle: object           # adapters.LoadedAdapter
    sha256: dict


def _stamp(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def check_weights(weights: dict[str, float] | None, names: Sequence[str]) -> None:
    """The mixing prior of a request: `weights` must name exactly the composed sources, each a valid
    lambda (the edge checks it before queuing; the worker's plan checks it again)."""
    if weights is None:
        return
    if set(weights) != set(names):
        raise Invalid(f"weights must name exactly the composed sources: {', '.join(names)}")
    try:
        lambdas_for(weights, names)
    except ComposeError as e:
        raise Invalid(str(e)) from None


class Engine:
    """The registry at `registry_dir` served from `pipe` (its backbone) by one worker thread.

    queue_size: jobs waiting beyond the one in progress (more -> Busy). threads: torch threads of
    the worker (default: the caller's torch.get_num_threads())."""

    def __init__(self, registry_dir: str | os.PathLike, pipe, queue_size: int = 16, threads: int | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.folder = Path(registry_dir)
        self._reg = Registry(self.folder)
        self._reg_stamp = _stamp(self.folder / REGISTRY_FILE)
        fp = getattr(pipe, "backbone_fingerprint", None)
        if fp != self._reg.backbone["fingerprint"]:
            raise RegistryError(f"the registry's backbone is {self._reg.backbone['fingerprint']} "
                                f"({self._reg.backbone['name']}); the pipeline given is {fp}")
        self.pipe = pipe
        self.keys = KeyStore(self.folder)
        self.audit = AuditLog(self.folder / SERVE_DIR / AUDIT_FILE, lock_folder=self.folder)
        self.image_size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        self.queue_size = queue_size
        self._threads = threads or torch.get_num_threads()
        self.cdm = CDMPipeline(pipe, registry=self._reg)
        self._pipe = threading.Lock()
        self._state = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._loaded: dict[str, _Applied] = {}
        self._broken: dict[str, tuple[dict, str]] = {}  # name -> (sha256 of the entry, why it failed)
        self._job_s = 1.0  # running mean of a job's seconds, for Retry-After
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Apply the registry's adapters, then start the worker."""
        self.sync()
        self._thread = threading.Thread(target=self._work, name="prompt-cdm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel queued jobs, let the running one finish, stop the worker, take every adapter off."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        with self._pipe:
            for name in list(self._loaded)[::-1]:
                self._loaded.pop(name).handle.remove()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def backbone_name(self) -> str:
        return self._reg.backbone["name"]

    # -- registry and keys ------------------------------------------------------------------------

    def _refresh(self) -> None:
        """(under _state) Reread the registry / key file when another process rewrote them."""
        stamp = _stamp(self.folder / REGISTRY_FILE)
        if stamp != self._reg_stamp:
            self._reg, self._reg_stamp = Registry(self.folder), stamp
        self.keys.refresh()

    def authenticate(self, token: str | None, admin: bool = False) -> KeyRecord:
        """The active key record of `token` (Unauthorized otherwise); `admin`: it must be an admin key."""
        with self._state:
            self._refresh()
            rec = self.keys.verify(token)
        if rec is None:
            raise Unauthorized("missing API key: send `Authorization: Bearer KEY`" if not token
                               else "unknown or revoked API key")
        if admin and not rec.admin:
            raise Forbidden("this endpoint needs an admin key")
        return rec

    def _allowed(self, key: KeyRecord) -> list[str]:
        """(under _state) The registered sources key's policy allows; none for admin keys or a missing
        policy (default deny)."""
        if key.admin or key.policy is None or key.policy not in self._reg.policies:
            return []
        if key.policy_id != self._reg.policy_id(key.policy):  # the policy was removed and made again
            return []
        have = self._reg.data["sources"]
        return [s for s in self._reg.policy(key.policy) if s in have]

    def _authorize(self, key: KeyRecord, sources: Sequence[str] | None) -> list[str]:
        """(under _state) The sources a request composes. A refusal names only what the caller asked
        for, the same whether a source exists or not."""
        allowed = self._allowed(key)
        if sources is None:
            if not allowed:
                raise Forbidden("this key may use no source")
            return allowed
        names = list(dict.fromkeys(sources))
        for s in names:
            if s not in allowed:
                raise Forbidden(f"this key may not use source {s!r}")
        return names

    def allowed(self, key: KeyRecord) -> list[dict]:
        """[{name, kind}] of the sources `key` may compose."""
        with self._state:
            self._refresh()
            return [{"name": s, "kind": self._reg.data["sources"][s]["kind"]} for s in self._allowed(key)]

    def authorize(self, key: KeyRecord, sources: Sequence[str] | None) -> list[str]:
        with self._state:
            self._refresh()
            return self._authorize(key, sources)

    # -- the applied adapters ---------------------------------------------------------------------

    def _sync(self) -> None:
        """(under _pipe and _state) Applied adapters := the registry's sources."""

        want = self._reg.data["sources"]
        for name in list(self._loaded)[::-1]:
            if name not in want or want[name]["sha256"] != self._loaded[name].sha256:
                self._loaded.pop(name).handle.remove()
        self._broken = {n: b for n, b in self._broken.items() if n in want and want[n]["sha256"] == b[0]}
        for name, entry in want.items():
            if name in self._loaded or name in self._broken:
                continue
            try:
                (src,), (handle,) = load_sources(self.pipe, None, self._reg, [name])
            except Exception as e:  # a damaged adapter: refuse requests that need it, serve the rest
                self._broken[name] = (dict(entry["sha256"]), f"{type(e).__name__}: {e}")
                continue
            self._loaded[name] = _Applied(src, handle, dict(entry["sha256"]))

    def sync(self) -> None:
        """Make the applied adapters equal the registry's sources (waits for the running job)."""
        with self._pipe, self._state:
            self._refresh()
            self._sync()

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    @property
    def broken(self) -> dict[str, str]:
        """{source: why its adapter does not load} (for admins; it may name server paths)."""
        return {n: why for n, (_, why) in self._broken.items()}

    # -- admin ------------------------------------------------------------------------------------

    def add_source(self, name: str, adapter_dir: str | os.PathLike, manifest=None) -> dict:
        """Check the folder on the pipeline (`load_adapter`, then taken off again: a folder that does not
        fit this backbone is refused with Invalid, its message naming the upload by `name`, never a server
        path), then `Registry.add` and load it: the entry + loaded/error."""
        from ..adapters.errors import AdapterError
        from ..adapters.store import load_adapter

        with self._pipe:
            try:
                load_adapter(adapter_dir, self.pipe, name=f"check-{uuid.uuid4().hex[:8]}").remove()
            except AdapterError as e:
                raise Invalid(f"cannot add {name!r}: {str(e).replace(str(adapter_dir), name)}") from None
            with self._state:
                self._refresh()
                try:
                    entry = self._reg.add(name, adapter_dir, manifest=manifest)
                except RegistryError as e:
                    raise Invalid(str(e).replace(str(adapter_dir), name)) from None
        self.sync()
        out = dict(entry, name=name, loaded=name in self._loaded)
        if name in self._broken:
            out["error"] = self._broken[name][1]
        return out

    def forget(self, name: str):
        """`Registry.forget` (refused to every later and queued request at once), then unload the
        adapter once the running generation has finished. Returns the ForgetReport."""
        with self._state:
            self._refresh()
            if name not in self._reg.data["sources"]:
                raise NotFound(f"unknown source {name!r}")
            try:
                report = self._reg.forget(name)
            except (RegistryError, OSError) as e:
                failure = e
            else:
                failure = None
            self._refresh()
        self.sync()  # the source left the index first: unload it even when its files could not all go
        if failure is not None:
            why = failure.strerror if isinstance(failure, OSError) and failure.strerror else str(failure)
            raise Conflict(f"forget {name!r} did not finish ({why}): it is out of the index, refused to every "
                           "request and unloaded; run `prompt-cdm registry forget` again to finish the deletion")
        return report

    def registry_view(self, what: str):
        with self._state:
            self._refresh()
            if what == "sources":
                return self._reg.summary()
            return self._reg.policies

    def set_policy(self, name: str, sources: Sequence[str]) -> list[str]:
        with self._state:
            self._refresh()
            return self._reg.set_policy(name, sources)

    def remove_policy(self, name: str) -> None:
        with self._state:
            self._refresh()
            if name not in self._reg.policies:
                raise NotFound(f"unknown policy {name!r}")
            self._reg.remove_policy(name)

    # -- generation -------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets the result dict or a ServeError. Raises Busy when full."""
        fut: Future = Future()
        try:
            self._queue.put_nowait((job, fut))
        except queue.Full:
            wait = max(1, math.ceil(self._job_s * (self._queue.qsize() + 1)))
            raise Busy(f"the service is at capacity ({self.queue_size} requests queued); retry after {wait} s",
                       wait) from None
        return fut

    def _work(self) -> None:
        torch.set_num_threads(self._threads)  # per thread under OpenMP: set it in the worker itself
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue  # timed out while queued
            t0 = time.perf_counter()
            try:
                fut.set_result(self.run(job))
            except Exception as e:
                fut.set_exception(e)
            self._job_s = 0.8 * self._job_s + 0.2 * (time.perf_counter() - t0)

    def _check_prompts(self, prompts: Sequence[str]) -> None:
        """(under _pipe) No prompt may reach an applied soft prompt's tokens by itself."""
        tok = self.pipe.tokenizer
        added = {i for i, t in tok.added_tokens_decoder.items() if not t.special}
        for p in prompts:
            if PLACEHOLDER_IN_TEXT.search(p) or (added and added & set(tok(p, add_special_tokens=False).input_ids)):
                raise Invalid(PLACEHOLDER_MSG)

    def run(self, job: Job) -> dict:
        """Run one job now, in this thread (the worker calls it; tests may too)."""
        with self._pipe:
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise Expired("the request timed out before its generation began")
            with self._state:
                self._refresh()
                if job.key_id not in {r.id for r in self.keys.records() if r.active}:
                    raise Unauthorized("unknown or revoked API key")
                names = self._authorize(self.keys.get(job.key_id), job.sources)
                self._sync()
                broken = [n for n in names if n in self._broken]
                if broken:  # the reason names server paths: it is the admin's (GET /v1/admin/sources)
                    raise Conflict(f"source {broken[0]!r} is unavailable: its adapter does not load on this "
                                   "backbone; ask an admin to forget it or add a working one")
                check_weights(job.weights, names)
                self.cdm.registry = self._reg
                try:
                    request = ComposeRequest(job.prompts, sources=names, estimator=job.router, lambdas=job.weights,
                                             caption_prior=1.0 if job.caption_prior else None, sparse=job.sparse,
                                             steps=job.steps, guidance=job.guidance, seed=job.seed)
                    plan = self.cdm.plan(request, sources=[self._loaded[n].source for n in names])
                except ProviderError as e:  # the registry's message may name other sources or its folder
                    if e.need == "heads":
                        raise Invalid(f"router {job.router!r} has no usable trained heads for these sources; use "
                                      "uniform, fixed, ito or path, or ask an admin to train it") from None
                    raise Invalid("caption_prior: a composed source has no caption statistics; leave "
                                  "caption_prior off, or ask an admin to cache them (router cache)") from None
                except ComposeError as e:
                    raise Invalid(str(e)) from None
            self._check_prompts(job.prompts)
            t0 = time.perf_counter()
            try:
                res = self.cdm.run(plan)
            except ComposeError as e:
                raise Invalid(str(e)) from None
            seconds = time.perf_counter() - t0
        traces = res.traces_json()
        credit = res.credit
        self.audit.append({"request": job.id, "key": job.key_id, "sources": names, "credit": credit,
                           "router": job.router, "images": len(job.prompts), "steps": job.steps})
        return {
            "id": job.id, "sources": names, "router": job.router, "steps": job.steps, "guidance": job.guidance,
            "seed": job.seed, "credit": credit, "seconds": round(seconds, 4),
            "images": [{"prompt": p, "png_base64": _png_base64(im), "trace": t}
                       for p, im, t in zip(job.prompts, res.images, traces)],
        }
