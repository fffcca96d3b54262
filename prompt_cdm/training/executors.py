"""Where many independent jobs run: `local` (one after another in this process) or `ray` (a Ray cluster).

An executor is `run(fn, jobs) -> results` (in job order); `fn` is a module-level function and each job
plain picklable data, so any executor can ship them to other processes. It knows nothing about
training. Ray is an optional extra: `pip install 'prompt-cdm[ray]'`.
"""
from __future__ import annotations

from typing import Any, Callable


class ExecutorError(ValueError):
    """An executor is unknown or not installed; the message says the fix."""


class LocalExecutor:
    """Sequential, in this process (jobs can share what the process already loaded, e.g. the backbone)."""

    threads_per_job = 0  # leave torch's thread count alone

    def __call__(self, fn: Callable[[Any], Any], jobs: list) -> list:
        return [fn(job) for job in jobs]


class RayExecutor:
    """One Ray task per job, `cpus_per_job` CPUs each (torch gets as many threads).

    Joins a running Ray instance (`ray.init` already called, or `address`, e.g. 'auto'), else starts a
    local one. Ray schedules as many jobs at once as the cluster's CPUs allow."""

    def __init__(self, address: str | None = None, cpus_per_job: int = 1):
        if cpus_per_job < 1:
            raise ExecutorError(f"cpus_per_job must be >= 1, got {cpus_per_job}")
        self.ray = _import_ray()
        self.address, self.threads_per_job = address, cpus_per_job

    def __call__(self, fn: Callable[[Any], Any], jobs: list) -> list:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=True)
        task = ray.remote(num_cpus=self.threads_per_job)(fn)
        return ray.get([task.remote(job) for job in jobs])


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray, which is not installed: pip install 'prompt-cdm[ray]' "
                            "(or use the default local executor)") from None
    return ray


EXECUTORS: dict[str, Callable[..., Any]] = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(name: str, **options):
    """The executor `name` ('local' | 'ray') built with `options` (ray: address, cpus_per_job)."""
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
    try:
        return EXECUTORS[name](**options)
    except TypeError as e:
        raise ExecutorError(f"executor {name!r} does not take these options ({e})") from None
