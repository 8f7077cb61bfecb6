"""Servers on loopback: free ports, waiting for HTTP, stopping a process group, the test
PostgreSQL role, and the test LLM server's queue as its vLLM gauges show it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

PG_TEST_DSN = {"host": "127.0.0.1", "port": 5432, "dbname": "test"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def pg_test_user() -> str:
    """The PostgreSQL role for tests: the OS user `root` when it exists, else `postgres`."""
    import psycopg

    for user in ("root", "postgres"):
        try:
            with psycopg.connect(user=user, connect_timeout=5, **PG_TEST_DSN):
                return user
        except psycopg.OperationalError:
            continue
    pytest.fail("no PostgreSQL at 127.0.0.1:5432 (database 'test', role root or postgres)")


# -- the test LLM server's queue --------------------------------------------------------


def metrics_of(server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^(vllm:\w+)\{[^}]*\} (\S+)$", text, re.MULTILINE)}


async def post_chats(url: str, count: int, timeout_s: float) -> list[str]:
    """`count` rewrite requests at once; each one's status, or "timeout"."""
    import aiohttp

    from maga_tasks.method.prompts import rewrite_messages
    from maga_tasks.recipe import load_recipe

    body = {"model": "maga-default", "max_tokens": 64,
            "messages": rewrite_messages(load_recipe(), "Bees make honey from nectar.", "A poem.", "Children.")}

    async def one(session, i):
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body,
                                    headers={"X-Request-Id": f"d{i}/rewrite/0/0"},
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                await response.read()
                return str(response.status)
        except asyncio.TimeoutError:
            return "timeout"

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, i) for i in range(count)))
