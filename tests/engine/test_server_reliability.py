"""The server under a long run of streaming clients, many of whom hang up mid-stream: nothing is
left behind (1,000 requests on the tiny model, about 15 s on two cores)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx

from engine import EngineConfig
from planner.measure.http import ServerProcess

NUM_REQUESTS, CONCURRENCY, DISCONNECT_SHARE = 1000, 32, 0.3


def _metrics(client: httpx.Client) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0] + (":" + name.split('finished_reason="')[1].split('"')[0]
                                        if "finished_reason=" in name else "")
            values[key] = values.get(key, 0.0) + float(value)
    return values


async def _one(client: httpx.AsyncClient, i: int, rng: random.Random, statuses: list[int],
               finished: list[str]) -> None:
    hang_up_after = rng.randint(1, 20) if rng.random() < DISCONNECT_SHARE else None
    body = {"prompt": f"request {i} " * rng.randint(1, 30), "max_tokens": rng.randint(4, 40),
            "stream": True, "ignore_eos": rng.random() < 0.5, "temperature": 0.8, "seed": i}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        statuses.append(response.status_code)
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            choice = json.loads(line[6:])["choices"][0]
            if choice["finish_reason"]:
                finished.append(choice["finish_reason"])
            elif hang_up_after is not None and chunks >= hang_up_after:
                finished.append("hung up")
                return  # leaving the block closes the connection mid-stream


async def _drive(url: str, api_key: str, statuses: list[int], finished: list[str]) -> None:
    rng = random.Random(0)
    queue = list(range(NUM_REQUESTS))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {api_key}"}) as client:
        async def worker() -> None:
            while queue:
                await _one(client, queue.pop(), rng, statuses, finished)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def test_a_thousand_streams_with_hang_ups_leave_nothing_behind(model_dir):
    config = EngineConfig(model=model_dir, dtype="float32", max_num_seqs=16, max_num_batched_tokens=512)
    server = ServerProcess(config)
    try:
        statuses: list[int] = []
        finished: list[str] = []
        asyncio.run(_drive(server.url, server.api_key, statuses, finished))
        assert len(statuses) == NUM_REQUESTS and set(statuses) == {200}, Counter(statuses)
        assert server.client.get("/health").json()["status"] == "ok"
        for _ in range(200):  # the last aborts reach the core within a step or two
            m = _metrics(server.client)
            if m["pilot:num_requests_running"] == m["pilot:kv_cache_usage_perc"] == 0:
                break
            time.sleep(0.05)
        assert m["pilot:num_requests_running"] == m["pilot:num_requests_waiting"] == 0
        assert m["pilot:kv_cache_usage_perc"] == 0
        assert server.client.get("/health").json()["in_flight"] == 0
        reasons = {k.split(":")[-1]: v for k, v in m.items() if k.startswith("pilot:request_success_total:")}
        assert sum(reasons.values()) == NUM_REQUESTS
        # Every client that read its last chunk was counted as finished, not aborted; those that
        # hung up were aborted unless the engine finished them before it heard (a real race).
        hung_up = finished.count("hung up")
        seen = f"server: {reasons}; clients: {Counter(finished)}"
        assert len(finished) == NUM_REQUESTS and hung_up > 0.15 * NUM_REQUESTS, seen
        assert reasons.get("length", 0) + reasons.get("stop", 0) >= NUM_REQUESTS - hung_up, seen
        assert 0.5 * hung_up <= reasons.get("abort", 0) <= hung_up, seen
        assert server.process.poll() is None
    finally:
        server.close()
