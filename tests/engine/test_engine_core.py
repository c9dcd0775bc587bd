"""The engine core in its own process: one message per step carrying every request's new tokens,
text made by the front, and a server that says so when its core dies."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.core.client import EngineCoreClient
from engine.serving import start_server

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _config(model_dir: str, **overrides) -> EngineConfig:
    fields = {"dtype": "float32", "num_threads": 1, "max_num_seqs": 4}
    return EngineConfig(model=model_dir, **{**fields, **overrides})


def test_one_message_per_step_carries_every_request_and_the_front_makes_the_text(model_dir):
    prompts = ["one", "second prompt", "a third", "and the fourth one"]
    with LLM(_config(model_dir)) as llm:
        expected = llm.generate(prompts, GREEDY)
    client = EngineCoreClient(_config(model_dir))
    try:
        assert client._cores[0].process.pid != os.getpid()
        for i, prompt in enumerate(prompts):
            client.add_request(str(i), prompt, GREEDY)
        conn, messages, finished = client.connections[0], [], set()
        while len(finished) < 4:
            assert conn.poll(60), "the core stopped sending"
            kind, message = conn.recv()
            assert kind == "outputs" and len(message.stats) == 1  # one message, one step
            messages.append(message)
            finished |= {o.request_id for o in message.outputs if o.finish_reason}
        # The core steps as soon as a request arrives, so on a busy machine the first steps may
        # hold only the requests sent so far; once all four run, every step advances all four.
        together = next(i for i, m in enumerate(messages) if len(m.outputs) == 4)
        assert all(sorted(o.request_id for o in m.outputs) == ["0", "1", "2", "3"]
                   for m in messages[together:])
        assert all(len(o.new_token_ids) == 1 for m in messages for o in m.outputs)
        final = {o.request_id: o for m in messages for o in m.outputs if o.finish_reason}
        assert sorted(final) == ["0", "1", "2", "3"] and all(o.metrics.ttft for o in final.values())
        tokens = {str(i): [t for m in messages for o in m.outputs if o.request_id == str(i)
                           for t in o.new_token_ids] for i in range(4)}
        assert [tokens[str(i)] for i in range(4)] == [e.token_ids for e in expected]
        assert messages[-1].load.kv_blocks_used == 0  # all finished: the load says so
    finally:
        client.close()


def test_outputs_read_through_the_front_match_the_engine_in_process(model_dir):
    prompts = ["héllo wörld", "日本語", "plain"]
    with LLM(_config(model_dir)) as llm:
        expected = llm.generate(prompts, GREEDY)
    client = EngineCoreClient(_config(model_dir))
    try:
        ids = [client.add_request(None, p, GREEDY) for p in prompts]
        final = {}
        while client.has_unfinished_requests():
            final.update({o.request_id: o for o in client.step() if o.finished})
        assert [final[i].text for i in ids] == [e.text for e in expected]
        assert [final[i].prompt for i in ids] == prompts
        assert [final[i].prompt_token_ids for i in ids] == [e.prompt_token_ids for e in expected]
    finally:
        client.close()


def test_a_core_that_dies_fails_its_streams_and_the_server_says_so(model_dir):
    with start_server(_config(model_dir)) as running:
        pid = running.engine.engine._cores[0].process.pid
        with httpx.Client(base_url=running.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            with http.stream("POST", "/v1/completions", json={
                    "prompt": "abc", "max_tokens": 500, "ignore_eos": True, "stream": True}) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(pid, signal.SIGKILL)
                rest = "\n".join(lines)
            assert "engine" in rest and '"error"' in rest  # the stream ends with an error event
            deadline = time.monotonic() + 10
            while http.get("/health").status_code != 503:
                assert time.monotonic() < deadline, "the server still says it is healthy"
                time.sleep(0.05)
            reply = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
            assert reply.status_code == 503 and "exited" in reply.json()["error"]["message"]
        assert not running.engine.is_running


@pytest.mark.parametrize("data_parallel_size", [1, 2])
def test_server_counts_each_replicas_load(model_dir, data_parallel_size):
    config = _config(model_dir, data_parallel_size=data_parallel_size, num_threads=data_parallel_size)
    with start_server(config) as running:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            http.post("/v1/completions", json={"prompt": ["abc", "de"], "max_tokens": 4})
        stats = running.engine.stats()
        assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
        assert 0 < stats["kv_cache_touched"] <= 1
        assert len(running.engine.engine.load()) == data_parallel_size


def test_a_client_gone_after_its_request_finished_is_counted_once(model_dir):
    """The core's final output is in the stream but the client hangs up before reading it: the
    request finished (counted by its final output), so nothing is aborted or counted again."""
    import asyncio

    from engine.serving.async_engine import AsyncLLMEngine
    from engine.serving.metrics import ServerMetrics

    async def finish_then_hang_up(engine: AsyncLLMEngine) -> None:
        stream = await engine.add_request("abc", GREEDY)

        async def final_output_arrives() -> None:  # nobody reads it
            while not stream.ended:
                assert engine.is_running, engine.dead_reason()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(final_output_arrives(), timeout=60)
        stream.close()

    engine = AsyncLLMEngine(EngineCoreClient(_config(model_dir)), max_in_flight=4)
    metrics = ServerMetrics(engine, "m")
    aborted: list[str] = []
    engine.abort_listeners.append(lambda request_id, reason: aborted.append(reason))
    try:
        asyncio.run(finish_then_hang_up(engine))
    finally:
        engine.shutdown()
    counts = {s.labels["finished_reason"]: s.value for m in metrics.registry.collect()
              if m.name == "pilot:request_success" for s in m.samples if s.name.endswith("_total")}
    assert counts == {"length": 1.0} and aborted == []
