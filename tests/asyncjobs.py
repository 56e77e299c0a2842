"""Coroutine jobs (and targets that only look like they did their work) for
tests/test_async_jobs.py. Each writes what it did under `record_dir`, so the
tests judge from the job's side, not only from the queue's events."""

import asyncio
import os
from pathlib import Path

from supervisor import HandOff, LeaseLost, current_job


def _log(record_dir, name, line):
    with open(Path(record_dir) / name, "a") as f:
        f.write(line + "\n")


async def sleep_then_write(record_dir):
    """The issue's example: awaits, then writes; `current_job()` works here."""
    await asyncio.sleep(0.05)
    job = current_job()
    _log(record_dir, f"job-{job.id}.ran", str(os.getpid()))
    return {"written": True}  # a return value is success, as for sync jobs


def returns_coroutine(record_dir):
    """A sync function whose result is awaitable: it must be awaited."""
    return sleep_then_write(record_dir)


async def returns_coroutine_too(record_dir):
    """An async function returning a coroutine: awaited in turn."""
    await asyncio.sleep(0)
    return sleep_then_write(record_dir)


async def raise_error(record_dir):
    await asyncio.sleep(0.01)
    _log(record_dir, f"job-{current_job().id}.ran", "raising")
    raise ValueError("async job raised on purpose")


def generator(record_dir):
    """`yield` makes this a generator function: calling it runs nothing."""
    _log(record_dir, "generator.ran", "never")
    yield 1


async def async_generator(record_dir):
    _log(record_dir, "async_generator.ran", "never")
    yield 1


async def hand_off_when_stopping(record_dir):
    """Saves step 1, awaits the stop notice while another task keeps ticking
    (so the loop is not blocked), then saves step 2 and hands off. The next
    run finds step 2 and finishes."""
    job = current_job()
    if job.checkpoint_data:
        _log(record_dir, f"job-{job.id}.resumed", f"{job.checkpoint_data['step']} {os.getpid()}")
        return
    await job.checkpoint_async({"step": 1})
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
            if ticks <= 5:  # the test waits for these while the job awaits the notice
                _log(record_dir, f"job-{job.id}.ticks", str(ticks))

    _log(record_dir, f"job-{job.id}.waiting", str(os.getpid()))
    ticker = asyncio.create_task(tick())
    stopping = await job.wait_stopping_async(60)
    before_checkpoint = ticks
    await job.checkpoint_async({"step": 2})
    ticker.cancel()
    _log(record_dir, f"job-{job.id}.stopped", f"{stopping} {before_checkpoint}")
    raise HandOff("async job stopped cleanly at step 2")


async def checkpoint_until_lease_lost(record_dir):
    """First run: checkpoints until its lease is taken (LeaseLost, let
    through). A later run just finishes."""
    job = current_job()
    marker = Path(record_dir) / f"job-{job.id}.first"
    if marker.exists():
        _log(record_dir, f"job-{job.id}.finished", str(os.getpid()))
        return
    marker.write_text(str(os.getpid()))
    n = 0
    try:
        while True:
            n += 1
            await job.checkpoint_async({"n": n})
            await asyncio.sleep(0.02)
    except LeaseLost:
        _log(record_dir, f"job-{job.id}.lease_lost", str(n))
        raise


async def hog_memory(megabytes):
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    await asyncio.sleep(30)
