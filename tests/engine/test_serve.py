"""`pilot serve`: the OpenAI-compatible server on loopback, driven by the official `openai` client
and by raw HTTP, against the real engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml

from engine import LLM, EngineConfig, SamplingParams
from engine.serving import start_server

KEY = "sk-test-key"


def _config(model_dir: str, **overrides) -> EngineConfig:
    fields = {"dtype": "float32", "num_threads": 1, "max_num_seqs": 4, "max_num_batched_tokens": 512}
    return EngineConfig(model=model_dir, **{**fields, **overrides})


@pytest.fixture(scope="module")
def server(model_dir):
    with start_server(_config(model_dir), max_prompt_tokens=200, max_body_bytes=64 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _wait_idle(server, timeout: float = 10.0) -> None:
    """Until nothing is in flight and no KV block is held (or fail naming what is left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.engine.num_in_flight == 0 and server.engine.kv_blocks_used() == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"in flight: {server.engine.num_in_flight}, "
                         f"KV blocks held: {server.engine.kv_blocks_used()}")


# -- the API, through the official client -------------------------------------------------------


def test_completions_match_the_offline_engine_streamed_or_not(server, client, model_dir):
    prompt = [5, 6, 7, 8, 9, 10]
    with LLM(_config(model_dir)) as llm:
        offline = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    whole = client.completions.create(model=model_dir, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == offline.text
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (6, 12)
    chunks = list(client.completions.create(
        model=model_dir, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len(chunks) > 3  # streamed as produced, not in one piece


def test_batched_prompts_and_n_choices_are_indexed_and_counted(client, model_dir):
    out = client.completions.create(model=model_dir, prompt=["ab", "cd"], n=2, max_tokens=5,
                                    temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 20
    # Seeded: the same request gives the same choices; choices of one prompt differ by seed.
    again = client.completions.create(model=model_dir, prompt=["ab", "cd"], n=2, max_tokens=5,
                                      temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    echoed = client.completions.create(model=model_dir, prompt="echo me", max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith("echo me")


def test_chat_completions_streamed_and_whole(client, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=model_dir, messages=messages, max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(
        model=model_dir, messages=messages, max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text_and_are_never_streamed(trained_pair):
    target, _ = trained_pair
    config = EngineConfig(model=str(target), dtype="float32", num_threads=1, max_num_seqs=2)
    with start_server(config) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        # Seeded sampling from a briefly trained byte model: varied, repeatable text.
        request = {"model": str(target), "prompt": "def main():\n    ", "max_tokens": 60,
                   "temperature": 1.0, "seed": 1, "extra_body": {"ignore_eos": True}}
        text = client.completions.create(**request).choices[0].text
        stop = next(text[i:i + 2] for i in range(10, len(text) - 2) if text[i:i + 2].isalpha())
        cut = client.completions.create(**request, stop=[stop, "never in it"])
        assert cut.choices[0].text == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(**request, stop=stop, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]
        _wait_idle(running)
        # Cut by the server at a stop string: counted as stopped, not as given up by a client.
        reasons = {line.split('finished_reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                   for line in httpx.get(f"{running.url}/metrics").text.splitlines()
                   if line.startswith("pilot:request_success_total{")}
        assert reasons.get("stop", 0) == 2 and reasons.get("abort", 0) == 0, reasons


def test_models_health_and_metrics(server, client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_dir]
    described = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert described["max_model_len"] == 512 and described["pilot"]["vocab_size"] == 512
    assert EngineConfig.model_validate(described["pilot"]["engine"]) == server.engine.config
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    before = _scrape(server)
    client.completions.create(model=model_dir, prompt="abc", max_tokens=7, extra_body={"ignore_eos": True})
    client.completions.create(model=model_dir, prompt="abcd", max_tokens=3, extra_body={"ignore_eos": True})
    after = _scrape(server)
    assert after["pilot:generation_tokens_total"] - before["pilot:generation_tokens_total"] == 10
    assert after["pilot:time_to_first_token_seconds_count"] - before["pilot:time_to_first_token_seconds_count"] == 2
    assert after["pilot:inter_token_latency_seconds_count"] - before["pilot:inter_token_latency_seconds_count"] == 8
    assert after["pilot:e2e_request_latency_seconds_count"] - before["pilot:e2e_request_latency_seconds_count"] == 2
    for gauge in ("pilot:num_requests_running", "pilot:num_requests_waiting", "pilot:kv_cache_usage_perc",
                  "pilot:generation_tokens_per_second", "pilot:spec_decode_acceptance_rate",
                  "pilot:num_preemptions_total", "pilot:kv_cache_resident_perc"):
        assert gauge in after
    assert after["pilot:generation_tokens_per_second"] > 0
    # Blocks written stay resident after their requests finish: the share in use is back to 0.
    assert after["pilot:kv_cache_resident_perc"] > 0 == after["pilot:kv_cache_usage_perc"]


def _scrape(server) -> dict[str, float]:
    """Every unlabelled-by-status sample of /metrics, by name (labels dropped)."""
    text = httpx.get(f"{server.url}/metrics").text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if "_bucket" not in name:
            samples[name] = samples.get(name, 0.0) + float(value)
    return samples


# -- bad input: a 4xx naming the field, and the server carries on ------------------------------


BAD = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": 7}, 400, "prompt", "got 7"),
    ({"prompt": [1, "a"]}, 400, "prompt", "token ids"),
    ({"prompt": [1, 2, 999]}, 400, "prompt", "999"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": "x" * 300}, 400, "prompt", "limit of 200"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "not served"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k", "-1"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "x", "max_tokens": 600}, 400, "max_tokens", "context of 512"),
    ({"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "empty"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "x", "priority": 1}, 400, "priority", "scheduling_policy"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream is true"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unrecognized"),
    (b"[" * 30_000 + b"]" * 30_000, 400, None, "too deeply"),
    (b'{"prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}", 400, None, "not valid JSON"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed", "less than or equal to 9223372036854775807"),
    ({"prompt": "x", "seed": -(2**70)}, 400, "seed", "greater than or equal to -9223372036854775808"),
    (b'{"prompt": "a\\ud800b"}', 400, "prompt", "lone UTF-16 surrogate"),
    ({"prompt": "x", "temperature": 1e9}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": ["a"] * 300}, 400, "prompt", "300 sequences"),
    (b'{"prompt": "x", "stop": ["b", "a\\udc00"]}', 400, "stop[1]", "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("body, status, param, words", BAD, ids=[str(b)[:40] for b, *_ in BAD])
def test_bad_completion_requests_get_an_openai_error_naming_the_field(server, body, status, param, words):
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}/v1/completions", content=body,
                              headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_completion_tokens": 2},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
])
def test_bad_chat_requests_name_the_field(server, body, param):
    # Sent as ASCII JSON: a lone surrogate travels as its escape, as any client's JSON would send it.
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(body),
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * 70_000})
    assert response.status_code == 413 and "limit of 65536" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_the_api_key_guards_v1_but_not_health(model_dir):
    with start_server(_config(model_dir), api_key=KEY) as running:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.get(f"{running.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model=model_dir, prompt="a", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{running.url}/pilot/steps").status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert 'status="401"' in httpx.get(f"{running.url}/metrics").text


# -- load: overload, disconnects, priority -------------------------------------------------------


def test_overload_gets_429_with_retry_after_and_the_admitted_finish(model_dir):
    config = _config(model_dir, max_num_seqs=1)
    with start_server(config, max_waiting_requests=1) as running:
        body = {"prompt": "abc", "max_tokens": 300, "ignore_eos": True}
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{running.url}/v1/completions", json=body, timeout=60))) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        refused = next(r for r in results if r.status_code == 429)
        # Each refusal is promised a later slot than the one before (responses come back in the
        # order of refusal: the admitted ones take much longer).
        waits = [int(r.headers["Retry-After"]) for r in results if r.status_code == 429]
        assert waits[0] >= 1 and all(b > a or b == 60 for a, b in zip(waits, waits[1:])), waits
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results if r.status_code == 200)
        _wait_idle(running)


def test_disconnects_mid_stream_free_their_kv_blocks_at_once_under_load(server, model_dir):
    body = {"model": model_dir, "prompt": "x" * 40, "max_tokens": 400, "ignore_eos": True, "stream": True}
    finished: list[int] = []
    errors: list[BaseException] = []

    def leave_early() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                for i, _ in enumerate(response.iter_lines()):
                    if i == 6:
                        return  # closing the stream drops the connection mid-generation
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    def stay() -> None:
        try:
            response = httpx.post(f"{server.url}/v1/completions", timeout=60,
                                  json={**body, "stream": False, "max_tokens": 30})
            finished.append(response.json()["usage"]["completion_tokens"])
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=leave_early if i % 2 else stay) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and finished == [30] * 4
    _wait_idle(server, timeout=5)
    # 4 requests of 400 tokens would take far longer than the 30-token ones: they were aborted.
    assert time.monotonic() - started < 30
    assert server.engine.stats()["num_running"] == 0


def test_a_client_that_gives_up_on_a_whole_response_is_aborted(server, model_dir):
    aborted = _scrape(server).get("pilot:request_success_total", 0)
    with pytest.raises(httpx.ReadTimeout):  # 8 x 500 tokens, 4 at a time: far over 0.2 s
        httpx.post(f"{server.url}/v1/completions", timeout=0.2, json={
            "model": model_dir, "prompt": "abc", "max_tokens": 500, "n": 8, "ignore_eos": True})
    _wait_idle(server, timeout=5)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'finished_reason="abort"' in text
    assert _scrape(server)["pilot:request_success_total"] - aborted == 8


def test_priority_reaches_the_scheduler(model_dir):
    config = _config(model_dir, max_num_seqs=1, scheduling_policy="priority")
    with start_server(config) as running:
        # Who the engine took next, read off its own steps: the three prompts differ in length,
        # so a prefill's token count names its request. (Clients' replies are no witness: on a
        # busy machine a client thread can wake long after its request finished.)
        prompts = {"running": "ab", "normal": "abcdefgh", "urgent": "abcdefghijklmnop"}
        prefills: list[int] = []
        running.engine.engine.add_step_observer(
            lambda s: prefills.append(s.num_prefill_tokens) if s.num_prefill_seqs else None)

        def send(name: str, priority: int, tokens: int) -> None:
            httpx.post(f"{running.url}/v1/completions", timeout=60, json={
                "prompt": prompts[name], "max_tokens": tokens, "ignore_eos": True, "priority": priority})

        def seen(key: str, value: int) -> bool:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if running.engine.stats()[key] == value:
                    return True
                time.sleep(0.0005)
            return False

        # One long request holds the only seat; a normal one queues, then an urgent one with a
        # longer prompt. Once both are seen waiting together, the scheduler alone picks who goes
        # next. On a machine so busy that the seat frees before that, try again.
        for _ in range(5):
            prefills.clear()
            threads = [threading.Thread(target=send, args=a)
                       for a in (("running", 0, 480), ("normal", 5, 5), ("urgent", -5, 5))]
            threads[0].start()
            assert seen("num_running", 1)
            threads[1].start()
            assert seen("num_waiting", 1)
            threads[2].start()
            both_waited = seen("num_waiting", 2)
            for t in threads:
                t.join()
            if both_waited:
                assert len(prefills) == 3 and prefills[0] < prefills[2] < prefills[1], prefills
                return
        pytest.fail("the long request always finished before the others queued")


def test_a_stopped_engine_answers_503_with_retry_after(model_dir):
    with start_server(_config(model_dir)) as running:
        running.engine.shutdown()
        response = httpx.post(f"{running.url}/v1/completions", json={"prompt": "a"})
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert httpx.get(f"{running.url}/health").status_code == 503


# -- the command --------------------------------------------------------------------------------


def test_pilot_serve_launches_a_plan_file_and_stops_on_ctrl_c(model_dir, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"engine": _config(model_dir).model_dump(mode="json"), "replicas": 1}))
    env = {**os.environ, "PILOT_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "planner", "serve", "--config", str(plan),
                                "--port", "0", "--served-model-name", "tiny"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in process.stdout:
            if "serving on http://" in line:
                url = line.split("serving on ", 1)[1].split()[0]
                break
        assert url, "the server never said where it listens"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model="tiny", prompt="a", max_tokens=3).usage.completion_tokens == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_pilot_serve_bad_config_names_the_field(tmp_path, model_dir):
    from typer.testing import CliRunner

    from planner.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"engine": {"model": model_dir, "max_num_seqs": 0}}))
    result = CliRunner().invoke(app, ["serve", "--config", str(bad)])
    assert result.exit_code == 2 and "max_num_seqs" in result.output
    result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml" in result.output
    result = CliRunner().invoke(app, ["serve", "--config", str(bad), "--port", "70000"])
    assert result.exit_code == 2 and "--port" in result.output


def test_the_step_log_hands_a_profiler_every_step_once(server, client, model_dir):
    start = httpx.get(f"{server.url}/pilot/steps", params={"since": 10**9}).json()["next"]
    client.completions.create(model=model_dir, prompt="abcdef", max_tokens=9, extra_body={"ignore_eos": True})
    log = httpx.get(f"{server.url}/pilot/steps", params={"since": start}).json()
    assert log["next"] - start == len(log["steps"]) == 9 and log["dropped"] == 0
    assert sum(s["num_prefill_tokens"] for s in log["steps"]) == 7  # BOS + 6 bytes
    assert httpx.get(f"{server.url}/pilot/steps", params={"since": log["next"]}).json()["steps"] == []


def test_a_data_parallel_plan_serves_through_its_replicas(model_dir):
    with start_server(_config(model_dir, data_parallel_size=2)) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(client.completions.create(
            model=model_dir, prompt="abc", max_tokens=20, extra_body={"ignore_eos": True}
        ).usage.completion_tokens)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [20] * 4
        steps = httpx.get(f"{running.url}/pilot/steps").json()["steps"]
        assert {s["replica"] for s in steps} == {0, 1}
        assert _scrape(running)["pilot:generation_tokens_total"] == 80
