"""Stopping never hangs on a background task that swallows its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from qdash_mp.collector import daemon


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what a library catching CancelledError does

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(daemon._cancel(task), 10)
    assert task.cancelled()
    assert swallowed == 1


async def test_a_task_that_never_stops_is_logged_and_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(daemon, "CANCEL_WAIT", 0.05)
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    task = asyncio.get_running_loop().create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, "qdash_mp.collector"):
        await asyncio.wait_for(daemon._cancel(task), 10)
    assert not task.done()
    assert "immortal did not stop after 3 cancellations" in caplog.text
    assert "test_collector_cancel.py" in caplog.text  # where it was left behind
    release.set()
    await task


async def test_an_error_while_stopping_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("closing went wrong") from None

    task = asyncio.get_running_loop().create_task(fails_on_cancel(), name="bad")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, "qdash_mp.collector"):
        await daemon._cancel(task)
    assert "bad ended with an error while stopping: RuntimeError('closing went wrong')" in (
        caplog.text
    )
