"""Replay a workload against any OpenAI-compatible server over HTTP, streaming, and time it.

The in-process load generator (planner/measure/in_process.py) drives the engine directly; this one is its
counterpart for a launched server — ours, vLLM or SGLang — so that the same workload and seed
give the same requests, and the latency numbers come out of the same code (planner/spec/slo.py).

A request's latency is measured from the moment the client sends it: queueing inside the
server counts, time the client itself was late does not (it is reported as `max_send_lag_s`
so an overloaded client shows).
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from planner.spec.errors import FieldError
from planner.spec.slo import SLO, RequestLatency, goodput, meets, request_meets, summarize
from planner.spec.workload import RequestSpec, Workload

Endpoint = Literal["completions", "chat"]
ENDPOINTS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# One common English word per token: close to one BPE token each, so a chat prompt has about
# the planned length on a real tokenizer.
_WORDS = ("the of and to in is that it for on with as was at by be this from or have an are not "
          "but all were when we there can more if no out so said what up its about into than them "
          "only other new some could time these two may then do first any my now such like our over "
          "man me even most made after also did many before must through back years where much your "
          "way well down should because each just those people how too little state good very make "
          "world still own see men work long get here between both life being under never day same "
          "another know while last might us great old year off come since against go came right used "
          "take three").split()


class BenchError(FieldError):
    """A benchmark that cannot run as asked; names the field and the value."""


# ---- server-sent events ----

class SSEDecoder:
    """Server-sent events, a line at a time: `feed` returns an event's data when the blank line
    that ends it arrives. Comments (":...") and fields other than `data` are skipped."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The event in progress, for a stream that ends without its final blank line."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class LineSplitter:
    """Bytes as they arrive to whole lines ("\n"-terminated; a "\r" before it is the SSE
    decoder's to drop), a character split across reads kept until it is whole."""

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._tail = ""

    def feed(self, raw: bytes) -> list[str]:
        *lines, self._tail = (self._tail + self._decode(raw)).split("\n")
        return lines

    def rest(self) -> str:
        """What followed the last newline, at the end of the stream."""
        tail, self._tail = self._tail + self._decode(b"", final=True), ""
        return tail


def parse_event(data: str) -> dict[str, Any] | None:
    """An event's JSON object; None for the `[DONE]` sentinel. ValueError if it is neither."""
    if data.strip() == "[DONE]":
        return None
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"expected a JSON object in the stream, got {data[:200]!r}")
    return event


def event_text(event: dict[str, Any]) -> str:
    """The generated text a chunk carries (completions `text`, or chat `delta.content`)."""
    choices = event.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def carries_output(event: dict[str, Any], first: bool = False) -> bool:
    """Whether a chunk delivers output tokens. A completions chunk does, text or not (a token
    may be bytes of a character not yet whole, or have no text at all); a chat chunk does when it
    has content — the first chunk only names the role, and a finish chunk of its own follows the
    last token at once — except a finish with nothing before it (every token was textless)."""
    choices = event.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    if "delta" in choice:
        return bool(event_text(event)) or (first and bool(choice.get("finish_reason")))
    return True


def error_message(body: bytes | str) -> str:
    """The `message` of an OpenAI error body, or the start of whatever the body is."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in data:  # FastAPI's own errors
            return str(data["detail"])[:300]
    return text.strip()[:300]


# ---- one request ----

@dataclass
class RequestRecord:
    """What happened to one request; times are time.perf_counter() values."""

    index: int
    planned_input_tokens: int
    planned_output_tokens: int
    scheduled_s: float | None = None  # offset from the run's start; None under a closed loop
    send_time: float = 0.0
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried output
    completion_tokens: int | None = None  # from the usage chunk
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None
    response_id: str | None = None  # the server's `id` for the response

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.planned_input_tokens

    def latency(self) -> RequestLatency:
        """TTFT, ITL and E2E from the chunk times; TPOT over the token count the server
        reported: a chunk may carry several tokens (speculative decoding, a token whose bytes
        are not yet a whole character), and the count, not the chunks, is what was generated."""
        measured = RequestLatency.from_token_times(self.send_time, self.chunk_times)
        return dataclasses.replace(measured, output_tokens=max(1, self.output_tokens))

    def take(self, event: dict[str, Any], now: float) -> None:
        """Fold one parsed chunk into the record."""
        if event.get("error"):
            err = event["error"]
            self.error = f"error in stream: {err.get('message', err) if isinstance(err, dict) else err}"
            return
        if self.response_id is None and isinstance(event.get("id"), str):
            self.response_id = event["id"]
        if carries_output(event, first=not self.chunk_times):
            self.chunk_times.append(now)
        choices = event.get("choices") or []
        if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
            self.finish_reason = str(choices[0]["finish_reason"])
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.completion_tokens = _int_or_none(usage.get("completion_tokens"))
            self.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = _int_or_none(details.get("cached_tokens"))


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Target:
    """Where and how requests go."""

    url: str
    model: str
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    timeout_s: float = 600.0

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def chat_prompt(token_ids: Sequence[int], vocab_size: int) -> str:
    """A text prompt of about len(token_ids) tokens: a letter per token on a byte-level
    vocabulary (one byte is one token), else a common word per token."""
    if vocab_size <= 512:
        return "".join(chr(ord("a") + t % 26) for t in token_ids)
    return " ".join(_WORDS[t % len(_WORDS)] for t in token_ids)


def request_body(target: Target, spec: RequestSpec, token_ids: list[int], vocab_size: int) -> bytes:
    body: dict[str, Any] = {
        "model": target.model, "max_tokens": spec.output_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
        # vLLM's (and pilot's) extension: run to max_tokens, so the output lengths are the plan's.
        "ignore_eos": True}
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": chat_prompt(token_ids, vocab_size)}]
    else:
        body["prompt"] = token_ids
    return json.dumps(body).encode()


async def send_request(client: httpx.AsyncClient, target: Target, record: RequestRecord,
                       body: bytes) -> None:
    """Send one request and stream its answer into `record`; never raises for a failure of the
    request itself (an HTTP error, a timeout, a broken stream): those are counted."""
    decoder = SSEDecoder()
    record.send_time = time.perf_counter()
    try:
        async with client.stream("POST", ENDPOINTS[target.endpoint], content=body,
                                 headers=target.headers()) as response:
            record.status = response.status_code
            if response.status_code >= 400:
                message = error_message(await response.aread())
                record.error = f"HTTP {response.status_code}: {message}"
                return
            done, lines = False, LineSplitter()
            async for raw in response.aiter_bytes():
                # Every chunk of one network read arrived at one moment: stamping each as it is
                # parsed would turn a burst into gaps of microseconds and pull ITL toward zero.
                now = time.perf_counter()
                for line in lines.feed(raw):
                    data = decoder.feed(line)
                    done = data is not None and _take(record, data, now)
                    if done or record.error:
                        break
                if done or record.error:
                    break
            if not done and not record.error and (data := decoder.feed(lines.rest()) or decoder.flush()):
                _take(record, data, time.perf_counter())
    except httpx.TimeoutException:
        record.error = f"timed out after {target.timeout_s:g} s (--timeout)"
    except httpx.HTTPError as err:
        record.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    finally:
        record.end_time = time.perf_counter()
    if record.error is None and not record.chunk_times:
        record.error = "the stream ended without any output"


def _take(record: RequestRecord, data: str, now: float) -> bool:
    """Fold one event's data into `record`; True at `[DONE]`."""
    try:
        event = parse_event(data)
    except ValueError:
        record.error = f"unreadable chunk in stream: {data[:200]!r}"
        return False
    if event is None:
        return True
    record.take(event, now)
    return False


# ---- a run ----

class RequestSource:
    """The workload's requests, made as they are needed (a duration-limited run does not know
    how many it will send): request i is the same whatever the run's length, and its prompt is
    the one planner/measure/in_process.py would send, from the same seeded generator."""

    def __init__(self, workload: Workload, vocab_size: int) -> None:
        self.workload, self.vocab_size = workload, vocab_size
        self._specs: list[RequestSpec] = []
        self._prompts: list[list[int]] = []
        self._rng = np.random.default_rng(workload.seed)

    def spec(self, i: int) -> RequestSpec:
        if i >= len(self._specs):  # sample(n) is a prefix of sample(2n): grow by doubling
            self._specs = self.workload.sample(max(64, 2 * len(self._specs), i + 1))
        return self._specs[i]

    def prompt(self, i: int) -> list[int]:
        while len(self._prompts) <= i:  # in order: every prompt draws from one generator
            self._prompts.append(self.workload.prompt_token_ids(self.spec(len(self._prompts)),
                                                                self.vocab_size, self._rng))
        return self._prompts[i]


@dataclass
class Progress:
    sent: int
    done: int
    failed: int
    elapsed_s: float


@dataclass
class LoadResult:
    records: list[RequestRecord]  # in the order sent
    start_time: float  # perf_counter at the run's start
    duration_s: float  # start to the last answer's end
    max_send_lag_s: float  # how late the client sent its latest request (open loop)


async def _run(target: Target, source: RequestSource, concurrency: int | None,
               max_requests: int | None, duration_s: float | None,
               on_progress: Callable[[Progress], None] | None) -> LoadResult:
    records: list[RequestRecord] = []
    counts = {"done": 0, "failed": 0}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(target.timeout_s, connect=min(target.timeout_s, 30.0))
    lag = 0.0
    async with httpx.AsyncClient(base_url=target.url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()

        def report() -> None:
            if on_progress is not None:
                on_progress(Progress(len(records), counts["done"], counts["failed"],
                                     time.perf_counter() - start))

        def body_of(i: int) -> bytes:
            return request_body(target, source.spec(i), source.prompt(i), source.vocab_size)

        def record_of(i: int) -> RequestRecord:
            spec = source.spec(i)
            record = RequestRecord(i, spec.input_tokens, spec.output_tokens,
                                   None if concurrency else spec.arrival_time)
            records.append(record)
            return record

        async def fire(record: RequestRecord, body: bytes) -> None:
            await send_request(client, target, record, body)
            counts["done"] += 1
            counts["failed"] += not record.ok
            report()

        def more(i: int) -> bool:
            if max_requests is not None and i >= max_requests:
                return False
            return duration_s is None or time.perf_counter() - start < duration_s

        if concurrency is not None:  # closed loop: each worker sends its next as one ends
            counter = itertools.count()

            async def worker() -> None:
                while True:
                    i = next(counter)
                    if max_requests is not None and i >= max_requests:
                        return
                    body = body_of(i)
                    # The deadline is checked once the body is built: a request is sent before
                    # it or not at all, however long building took.
                    if not more(i):
                        return
                    await fire(record_of(i), body)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:  # open loop: on the schedule, whether or not earlier requests have answered
            tasks: list[asyncio.Task[None]] = []
            for i in itertools.count():
                offset = source.spec(i).arrival_time or 0.0
                if not more(i) or (duration_s is not None and offset >= duration_s):
                    break
                ready = record_of(i), body_of(i)  # built before its time, not charged to it
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = max(lag, time.perf_counter() - (start + offset))
                tasks.append(asyncio.create_task(fire(*ready)))
                await asyncio.sleep(0)  # let it record its send time before the next is timed
            await asyncio.gather(*tasks)
        end = max([r.end_time for r in records], default=time.perf_counter())
    return LoadResult(records, start, max(end - start, 1e-9), lag)


def run_load(target: Target, workload: Workload, vocab_size: int, concurrency: int | None = None,
             max_requests: int | None = None, duration_s: float | None = None,
             on_progress: Callable[[Progress], None] | None = None) -> LoadResult:
    """Send `workload`'s requests to `target`: `concurrency` in flight (closed loop), else at
    the workload's arrival times. Stops after `max_requests`, or stops sending after
    `duration_s` seconds and waits for those in flight; one of the two must be given."""
    if max_requests is None and duration_s is None:
        raise BenchError("give a number of requests or a duration", field="requests")
    if max_requests is not None and max_requests < 1:
        raise BenchError(f"must be >= 1, got {max_requests}", field="requests")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise BenchError(f"must be positive, got {duration_s!r}", field="duration")
    if concurrency is not None and concurrency < 1:
        raise BenchError(f"must be >= 1, got {concurrency}", field="concurrency")
    if concurrency is None and workload.sample(1)[0].arrival_time is None:
        raise BenchError("the workload is closed-loop: give a concurrency")
    return asyncio.run(_run(target, RequestSource(workload, vocab_size), concurrency, max_requests,
                            duration_s, on_progress))


# ---- what a run measured ----

@dataclass
class LoadSummary:
    num_requests: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    duration_s: float
    throughput_tok_s: float  # output tokens / s
    request_rate: float  # completed requests / s
    latency: dict[str, float]  # planner.spec.slo.summarize over completed requests; {} if none
    goodput: float | None  # requests / s that met every SLO
    attainment: float | None  # share of all requests (failed ones included) that met every SLO
    slos_met: bool | None  # the run's percentiles within every SLO, and nothing failed
    max_send_lag_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # message -> count


def summarize_records(records: Sequence[RequestRecord], duration_s: float,
                      slos: Sequence[SLO] | None = None, max_send_lag_s: float = 0.0) -> LoadSummary:
    """The run's numbers, computed as the in-process profiler computes them (planner/spec/slo.py)."""
    done = [r for r in records if r.ok]
    latencies = [r.latency() for r in done]
    latency = summarize(latencies) if latencies else {}
    met = sum(request_meets(lat, slos) for lat in latencies) if slos else 0
    output_tokens = sum(r.output_tokens for r in done)
    return LoadSummary(
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        input_tokens=sum(r.input_tokens for r in done), output_tokens=output_tokens,
        duration_s=duration_s, throughput_tok_s=output_tokens / duration_s,
        request_rate=len(done) / duration_s, latency=latency,
        goodput=goodput(latencies, list(slos), duration_s) if slos else None,
        attainment=(met / len(records) if records else 0.0) if slos else None,
        slos_met=(bool(latency) and len(done) == len(records) and meets(slos, latency)) if slos else None,
        max_send_lag_s=max_send_lag_s,
        errors=dict(Counter(r.error or "no output" for r in records if not r.ok).most_common()))
