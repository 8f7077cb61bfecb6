"""The routing suite of `maga bench` (see `tools.bench`): two vLLM CPU servers, the same
documents expanded twice, once with the client's document-affine routing over both
endpoints (`llm.routing`: a document's pairs call and rewrites meet one server's prefix
cache) and once through one URL, a round-robin balancer on loopback that sends each
request to the next server in turn, as a user puts in front of a fleet for a tool that
takes one URL. Printed per mode: the fleet's output tokens/s and each server's
prefix-cache hit rate from /metrics deltas."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import aiohttp
from aiohttp import web

from maga_tasks.recipe import builtin_recipe_path
from maga_tasks.tools.benchmarks.engine import measure_expansion, write_bench_shard
from maga_tasks.tools.benchmarks.figures import REPO, Figures

log = logging.getLogger(__name__)

SERVERS = 2
# Only what a request needs: hop-by-hop headers (Host, Content-Length, Connection) are
# the proxy's own on each leg.
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept")


class RoundRobinBalancer:
    """A loopback HTTP proxy: each request, whatever its path, goes to the next upstream
    in turn; the answer comes back whole (the pipeline does not stream). Runs its own
    event loop in a thread, so the suite's process stays synchronous."""

    def __init__(self, upstreams: Sequence[str], host: str = "127.0.0.1"):
        from maga_tasks.llm.vllm_local import free_port

        self.upstreams = list(upstreams)
        self.host, self.port = host, free_port(host)
        self.forwarded = [0] * len(self.upstreams)
        self.failed = 0  # requests no upstream answered (502 to the client)
        self._turn = itertools.cycle(range(len(self.upstreams)))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="round-robin", daemon=True)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _forward(self, request: web.Request) -> web.Response:
        turn = next(self._turn)
        self.forwarded[turn] += 1
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        try:
            async with self._session.request(request.method, self.upstreams[turn] + request.path_qs,
                                             data=await request.read(), headers=headers,
                                             allow_redirects=False) as answer:
                body = await answer.read()
                kept = {name: answer.headers[name] for name in ("Content-Type",) if name in answer.headers}
                return web.Response(status=answer.status, body=body, headers=kept)
        except (aiohttp.ClientError, OSError) as error:  # as a balancer answers: Bad Gateway
            self.failed += 1
            return web.Response(status=502, text=f"upstream {turn + 1}: {error}")

    async def _open(self) -> None:
        # No connection limit and no timeout: the client behind it owns both. A fresh
        # connection per request: reusing one the server's keep-alive timer has just
        # closed reset a few requests a run in a first try (a loopback connect costs ~0.1 ms).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                              timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def _close(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(30)
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def reset_prefix_cache(url: str) -> None:
    """Empty a server's prefix cache (a dev-mode route), so each mode starts cold."""
    request = urllib.request.Request(url + "/reset_prefix_cache", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        if b"true" not in answer.read():
            raise RuntimeError(f"{url} did not reset its prefix cache")


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def record_mode(figures: Figures, mode: str, run: dict, before: list[dict], after: list[dict]) -> float:
    """One mode's figures from its expansion and each server's /metrics before and after;
    returns the fleet's output tokens/s."""
    from maga_tasks.llm.prometheus import prefix_cache_hit_rate

    tps = run["completion_tokens"] / run["seconds"]
    figures.add(f"{mode}: fleet output tokens/s", tps, "tok/s")
    hits = queries = 0.0
    for n, (start, end) in enumerate(zip(before, after, strict=True), 1):
        figures.add(f"{mode}: prefix-cache hit rate, server {n}", prefix_cache_hit_rate(start, end), "share")
        figures.add(f"{mode}: requests answered, server {n}", _delta(start, end, "vllm:request_success_total"),
                    "requests")
        hits += _delta(start, end, "vllm:prefix_cache_hits_total")
        queries += _delta(start, end, "vllm:prefix_cache_queries_total")
    fleet_rate = hits / queries if queries else None
    figures.add(f"{mode}: prefix-cache hit rate, fleet", fleet_rate, "share")
    figures.add(f"{mode}: prompt tokens computed (not cached)", queries - hits, "tokens")
    log.info("routing %s: %.1f tok/s, fleet prefix-cache hit rate %s", mode, tps, fleet_rate)
    return tps


def routing_suite(args, figures: Figures) -> dict:
    from maga_tasks.llm.vllm_local import read_metrics, start_vllm_server

    model_dir = args.model_dir or str(REPO / "var" / "models" / "maga-tiny")
    served = args.served_model or "maga-tiny"
    if not Path(model_dir, "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), model_dir], check=True)
    recipe = args.recipe or str(builtin_recipe_path("tiny"))
    work = Path(tempfile.mkdtemp(prefix="maga-bench-routing-"))
    shard = write_bench_shard(work / "routing" / "part-0000.parquet", args.routing_docs)
    warm = write_bench_shard(work / "warm" / "part-0000.parquet", 2)
    # The children read the key from the environment, as the pipeline does; the balancer
    # must pass it on.
    api_key = os.environ.setdefault("MAGA_API_KEY", secrets.token_urlsafe(16))
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")  # for /reset_prefix_cache
    expand = {"recipe": recipe, "tokenizer": args.tokenizer or model_dir, "served_model": served, "fixed": True}
    servers = []
    try:
        for n in range(SERVERS):  # started together: their ~30 s startups overlap
            servers.append(start_vllm_server(model_dir, served_model_name=served, api_key=api_key, env=env,
                                             max_num_seqs=max(8, args.routing_concurrency),
                                             log_path=work / f"vllm-{n}.log"))
        for server in servers:
            server.wait_healthy(timeout=600)
        urls = [server.url for server in servers]
        with RoundRobinBalancer(urls) as balancer:
            modes = {"affine": urls, "round-robin": [balancer.url]}
            measure_expansion(warm, urls, args.routing_concurrency, output_root=work / "warm-out", **expand)
            tps: dict[str, float] = {}
            for repeat in range(args.repeats):
                order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
                for mode in order:
                    for url in urls:
                        reset_prefix_cache(url)
                    before = [read_metrics(url) for url in urls]
                    run = measure_expansion(shard, modes[mode], args.routing_concurrency,
                                            output_root=work / f"{mode}-{repeat}", **expand)
                    after = [read_metrics(url) for url in urls]
                    tps[mode] = record_mode(figures, mode, run, before, after)
                figures.add("output tokens/s ratio affine / round-robin", tps["affine"] / tps["round-robin"], "x")
            forwarded, failed = balancer.forwarded, balancer.failed
    finally:
        for server in servers:
            server.stop()
    return {"servers": SERVERS, "documents": args.routing_docs, "concurrency": args.routing_concurrency,
            "adaptive": False, "balancer_forwarded": forwarded, "balancer_failed": failed, "served_model": served,
            "endpoint": "two local vLLM CPU servers (tiny random model)"}
