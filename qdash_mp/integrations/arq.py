"""arq: ``instrument(WorkerSettings)`` for workers, ``ArqRedis`` / ``create_pool`` for producers.

``instrument`` returns the settings class with every function wrapped and ``on_startup`` /
``on_shutdown`` chained (the user's own hooks still run). arq's ``on_job_start`` /
``on_job_end`` only see the job id and try, so the wrapper around each coroutine does the
reporting; it runs on the worker's single event loop:

==========================  ===============================================================
qdash_mp event              arq
==========================  ===============================================================
pushed                      ``ArqRedis.enqueue_job`` returning a job (``None`` = id exists)
started                     the wrapper, before the coroutine
processed (runtime)         the coroutine returned
retried                     it raised ``Retry`` below ``max_tries``, or was cancelled
                            (arq runs a cancelled job again)
failed                      any other exception (also a timeout); ``Retry`` at the last
                            try (arq will fail it as "max retries exceeded" unrun)
==========================  ===============================================================

Not seen (arq never calls the function): a job expired before it ran, or naming a function
the worker lacks; and an abort by ``Job.abort`` counts as retried, as a cancel does.

A dashboard retry arrives on the client's thread; it is run on the worker's loop with
``run_coroutine_threadsafe(pool.enqueue_job(name, *args, _queue_name=queue, **kwargs))`` and
waited for; ``None`` (a job with that id exists) is raised as an error, so the record stays.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import arq
from arq.connections import ArqRedis as _ArqRedis
from arq.constants import default_queue_name
from arq.worker import Function, Retry, func

from qdash_mp.integrations._common import (
    ProcessClient,
    job_args,
    make_job,
)
from qdash_mp.models import Job

__all__ = ["ArqRedis", "clients", "create_pool", "instrument"]

clients = ProcessClient()
"""This process's client (producers and the worker share it)."""

_REQUEUE_TIMEOUT = 30.0
_DEFAULT_MAX_TRIES = 5  # arq.worker.Worker's default
_DEFAULT_TIMEOUT = 300.0


class ArqRedis(_ArqRedis):
    """``arq.connections.ArqRedis`` that counts every job it enqueues as pushed."""

    async def enqueue_job(self, function: str, *args: Any, **kwargs: Any) -> Any:
        job = await super().enqueue_job(function, *args, **kwargs)
        if job is not None:
            clients.get().on_pushed(kwargs.get("_queue_name") or self.default_queue_name)
        return job


async def create_pool(*args: Any, **kwargs: Any) -> ArqRedis:
    """``arq.create_pool`` returning this module's counting ``ArqRedis``."""
    pool = await arq.create_pool(*args, **kwargs)
    pool.__class__ = ArqRedis  # same layout: only enqueue_job differs
    return pool  # type: ignore[return-value]


def instrument(settings: type[Any], socket_path: str | os.PathLike[str] | None = None) -> Any:
    """Wrap ``settings.functions`` and chain ``on_startup``/``on_shutdown``; returns it."""
    if socket_path is not None:
        clients.socket_path = socket_path
    queue = getattr(settings, "queue_name", None) or default_queue_name
    default_tries = getattr(settings, "max_tries", None) or _DEFAULT_MAX_TRIES
    default_timeout = getattr(settings, "job_timeout", None) or _DEFAULT_TIMEOUT
    wrapped = []
    for f in getattr(settings, "functions", ()):
        function = func(f)
        if getattr(function.coroutine, "__qdash_wrapped__", False):
            wrapped.append(function)
            continue
        tries = function.max_tries or default_tries
        timeout = function.timeout_s or _seconds(default_timeout)
        coroutine: Any = _wrap(function.name, function.coroutine, queue, tries, timeout)
        wrapped.append(
            Function(
                function.name,
                coroutine,
                function.timeout_s,
                function.keep_result_s,
                function.keep_result_forever,
                function.max_tries,
            )
        )
    settings.functions = wrapped
    settings.on_startup = _chain_startup(getattr(settings, "on_startup", None), queue)
    settings.on_shutdown = _chain_shutdown(getattr(settings, "on_shutdown", None))
    return settings


def _seconds(value: Any) -> float:
    return float(value.total_seconds()) if hasattr(value, "total_seconds") else float(value)


def _payload(started: Job, args: Any, kwargs: Any, queue: str) -> Job:
    """The started job with its payload, for a failure (the success path never builds it)."""
    at = started.enqueued_at
    return make_job(started.id, started.name, args, kwargs, queue, started.attempts, at)


def _wrap(
    name: str,
    coroutine: Callable[..., Awaitable[Any]],
    queue: str,
    max_tries: int,
    timeout: float,
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(coroutine)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        client = clients.get()
        job_try = int(ctx.get("job_try") or 1)
        enqueued = ctx.get("enqueue_time")
        at = enqueued.timestamp() if enqueued is not None else None
        # The success path needs no payload: the id ends the active entry, the client times
        # the run from on_started. The payload (args/kwargs for a retry) is built on failure.
        started = Job(str(ctx.get("job_id", "")), name, None, job_try, at)
        client.on_started(queue, started)
        t0 = time.perf_counter()
        try:
            result = await coroutine(ctx, *args, **kwargs)
        except Retry as exc:
            if job_try >= max_tries:
                client.on_failed(queue, _payload(started, args, kwargs, queue), exc)
            else:
                client.on_retried(queue, started)
            raise
        except asyncio.CancelledError as exc:
            runtime = time.perf_counter() - t0
            if runtime >= timeout:
                error = TimeoutError(f"{name} ran longer than its timeout of {timeout:g}s")
                error.__cause__ = exc
                client.on_failed(queue, _payload(started, args, kwargs, queue), error, runtime)
            else:
                client.on_retried(queue, started)  # shutdown or abort: arq runs it again
            raise
        except Exception as exc:
            client.on_failed(queue, _payload(started, args, kwargs, queue), exc)
            raise
        client.on_processed(queue, started)
        return result

    run.__qdash_wrapped__ = True  # type: ignore[attr-defined]
    return run


Hook = Callable[[dict[str, Any]], Awaitable[Any]]


def _chain_startup(user: Hook | None, queue: str) -> Hook:
    async def on_startup(ctx: dict[str, Any]) -> None:
        if user is not None:
            await user(ctx)
        loop = asyncio.get_running_loop()
        pool = ctx["redis"]

        def requeue(job: Job) -> None:
            args, kwargs, where = job_args(job)
            target = where or queue
            coro = pool.enqueue_job(job.name, *args, _queue_name=target, **kwargs)
            enqueued = asyncio.run_coroutine_threadsafe(coro, loop).result(_REQUEUE_TIMEOUT)
            if enqueued is None:
                raise RuntimeError(f"arq refused the job: a job with its id is in {target!r}")

        clients.configure(requeue, [queue])

    return on_startup


def _chain_shutdown(user: Hook | None) -> Hook:
    async def on_shutdown(ctx: dict[str, Any]) -> None:
        try:
            if user is not None:
                await user(ctx)
        finally:
            await asyncio.to_thread(clients.close, 5.0)

    return on_shutdown
