"""The registry raced by real processes."""

from __future__ import annotations

import multiprocessing

from maga_tasks.registry import Registry


def _upgrade_worker(url: str, start, results) -> None:
    registry = Registry(url)
    start.wait()
    results.put(registry.upgrade())
    registry.close()


def race_upgrades(url: str, processes: int) -> list[list[int]]:
    """`upgrade()` from several processes released at the same moment; what each applied."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_upgrade_worker, args=(url, start, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    applied = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return applied
