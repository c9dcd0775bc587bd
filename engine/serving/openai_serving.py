"""`/v1/completions` and `/v1/chat/completions`: a request becomes one engine request per choice
(prompts x n), and their outputs become OpenAI responses, whole or as server-sent events.

Stop strings live here, not in the engine: the engine stops on token ids, while a stop string can
span tokens, so the text is watched as it grows, cut at the first stop string, and the request
aborted there. While streaming, the last few characters are held back until it is clear they do
not begin a stop string, so a client never receives text that is later taken back.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from engine.llm_engine import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput
from engine.serving.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError, RequestStream
from engine.serving.chat_template import ChatTemplate
from engine.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, _SamplingRequest, invalid


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its requests were aborted."""


@dataclass
class _Job:
    """One choice to generate: which prompt, its tokens, and how to sample it."""

    index: int
    prompt_index: int
    token_ids: list[int]
    params: SamplingParams


@dataclass
class Event:
    """New text of one choice; `finish_reason` set on its last event."""

    index: int
    text: str
    finish_reason: str | None
    num_output_tokens: int


class StopWatch:
    """Cuts one choice's growing text at the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def update(self, text: str, finished: bool) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string ended the choice."""
        stopped = False
        search_from = max(0, len(self.text) - self.hold)
        cut = min((i for i in (text.find(s, search_from) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
        self.text = text
        end = len(text) if finished or stopped else max(self.sent, len(text) - self.hold)
        delta, self.sent = text[self.sent:end], end
        return delta, stopped


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_names: list[str], chat_template: ChatTemplate,
                 max_prompt_tokens: int) -> None:
        self.engine = engine
        self.model_names = model_names
        self.chat_template = chat_template
        self.tokenizer = engine.engine.tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise APIError(404, f"model: {requested!r} is not served here; this server serves "
                                f"{', '.join(map(repr, self.model_names))}", param="model",
                           code="model_not_found")
        return requested

    # -- requests to engine jobs ------------------------------------------------------------------

    def _tokens(self, prompt: str | list[int], field: str) -> list[int]:
        try:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        except Exception as err:  # noqa: BLE001 - whatever the tokenizer refuses is the client's text
            raise invalid(field, f"cannot be tokenized: {type(err).__name__}: {err}") from None
        if not prompt or not token_ids:
            raise invalid(field, "must not be empty")
        if len(token_ids) > self.max_prompt_tokens:
            raise invalid(field, f"has {len(token_ids)} tokens, more than this server's limit of "
                                 f"{self.max_prompt_tokens}")
        return token_ids

    def _jobs(self, request: _SamplingRequest, prompts: list[list[int]],
              max_tokens: int | None) -> list[_Job]:
        jobs = []
        limit = self.engine.max_model_len
        for p, token_ids in enumerate(prompts):
            room = limit - len(token_ids)
            wanted = max_tokens if max_tokens is not None else room
            if max_tokens is None and room < 1:
                raise invalid("prompt", f"has {len(token_ids)} tokens, the model's whole context; "
                                        "no room is left for output")
            if wanted > room:
                raise invalid("max_tokens", f"{wanted} output tokens after a prompt of "
                                            f"{len(token_ids)} exceed the model's context of {limit}")
            for j in range(request.n):
                seed = request.seed + j if request.seed is not None else None
                try:
                    params = SamplingParams(
                        temperature=1.0 if request.temperature is None else request.temperature,
                        top_p=1.0 if request.top_p is None else request.top_p,
                        top_k=-1 if request.top_k is None else request.top_k, seed=seed,
                        max_tokens=wanted, stop_token_ids=request.stop_token_ids or [],
                        ignore_eos=request.ignore_eos)
                except (TypeError, ValueError) as err:
                    raise invalid(str(err).split(" ", 1)[0], str(err)) from None
                jobs.append(_Job(p * request.n + j, p, token_ids, params))
        if len(jobs) > self.engine.max_in_flight:  # it could never be admitted: no use retrying
            raise invalid("n" if len(prompts) == 1 else "prompt",
                          f"asks for {len(jobs)} sequences ({len(prompts)} prompts x n={request.n}), more "
                          f"than this server ever holds at once ({self.engine.max_in_flight})")
        return jobs

    async def _start(self, jobs: list[_Job], priority: int, request_id: str,
                     arrival: float) -> list[RequestStream]:
        """Admit every job or none: one refused job releases those already admitted."""
        if priority and self.engine.config.scheduling_policy != "priority":
            raise invalid("priority", f"{priority} asks for priority scheduling, which this server "
                                      "does not run; set scheduling_policy: priority in its config")
        streams: list[RequestStream] = []
        try:
            for job in jobs:
                streams.append(await self.engine.add_request(
                    job.token_ids, job.params, priority, f"{request_id}-{job.index}", arrival))
        except BaseException as err:
            for stream in streams:
                stream.close()
            raise _api_error(err) from err
        return streams

    async def _events(self, jobs: list[_Job], streams: list[RequestStream],
                      stops: list[str]) -> AsyncIterator[Event]:
        """Every choice's text as it grows, interleaved in the order the engine produces it."""
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

        async def pump(job: _Job, stream: RequestStream) -> None:
            try:
                watch = StopWatch(stops)
                async for output in stream:
                    delta, stopped = watch.update(output.text, output.finished)
                    reason = "stop" if stopped else _finish_reason(output)
                    # Every step's output is an event, text or not: a completions stream sends
                    # one chunk per step, which is what a client measures inter-token time by.
                    queue.put_nowait(Event(job.index, delta, reason, len(output.token_ids)))
                    if stopped:
                        stream.close("stop")
                        return
            except BaseException as err:  # noqa: BLE001 - reported through the queue
                queue.put_nowait(err)
            finally:
                stream.close()  # a stop string, an error or a cancel: the engine drops it

        tasks = [asyncio.create_task(pump(job, stream)) for job, stream in zip(jobs, streams)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise _api_error(item)
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.close()

    # -- completions -----------------------------------------------------------------------------

    async def completions(self, request: CompletionRequest, disconnected: asyncio.Event
                          ) -> dict[str, Any] | AsyncIterator[str]:
        arrival = time.perf_counter()
        model = self.model_name(request.model)
        field = "prompt"
        prompts = [self._tokens(p, field) for p in request.prompt]
        jobs = self._jobs(request, prompts, request.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        echoes = [self._echo(request.prompt[job.prompt_index]) if request.echo else "" for job in jobs]
        streams = await self._start(jobs, request.priority, request_id, arrival)
        events = self._events(jobs, streams, request.stop)
        prompt_tokens = sum(len(p) for p in prompts)
        head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": model}
        if request.stream:
            opening = [_text_choice(i, echo, None) for i, echo in enumerate(echoes) if echo]
            return _sse_stream(head, events, opening,
                               lambda e: [_text_choice(e.index, e.text, e.finish_reason)],
                               prompt_tokens, request.include_usage)
        texts, reasons, tokens = await _collect(events, len(jobs), disconnected)
        return {**head, "choices": [
            {"index": i, "text": echoes[i] + texts[i], "logprobs": None, "finish_reason": reasons[i]}
            for i in range(len(jobs))], "usage": _usage(prompt_tokens, sum(tokens))}

    def _echo(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    # -- chat --------------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, disconnected: asyncio.Event
                   ) -> dict[str, Any] | AsyncIterator[str]:
        arrival = time.perf_counter()
        model = self.model_name(request.model)
        messages = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})}
                    for m in request.messages]
        try:
            prompt = self.chat_template.render(messages)
        except ValueError as err:
            raise invalid("messages", str(err)) from None
        prompts = [self._tokens(prompt, "messages")]
        jobs = self._jobs(request, prompts, request.output_limit)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start(jobs, request.priority, request_id, arrival)
        events = self._events(jobs, streams, request.stop)
        head = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": model}
        if request.stream:
            opening = [_delta_choice(i, {"role": "assistant", "content": ""}, None)
                       for i in range(len(jobs))]
            return _sse_stream({**head, "object": "chat.completion.chunk"}, events, opening,
                               _chat_deltas, len(prompts[0]), request.include_usage)
        texts, reasons, tokens = await _collect(events, len(jobs), disconnected)
        return {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
             "finish_reason": reasons[i]} for i in range(len(jobs))],
            "usage": _usage(len(prompts[0]), sum(tokens))}

async def _sse_stream(head: dict, events: AsyncIterator[Event], opening: list[dict],
                      choices: Callable[[Event], list[dict]], prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the `opening` choices, then `choices(event)` for each event, an error
    that ends generation early, the usage if asked for, and `[DONE]`."""
    tokens: dict[int, int] = {}
    async with _closing(events):
        for choice in opening:
            yield _sse({**head, "choices": [choice]})
        try:
            async for event in events:
                tokens[event.index] = event.num_output_tokens
                for choice in choices(event):
                    yield _sse({**head, "choices": [choice]})
        except APIError as err:
            yield _sse(err.body())
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, sum(tokens.values()))})
    yield "data: [DONE]\n\n"


def _chat_deltas(event: Event) -> list[dict]:
    """A chat stream's chunks for one event: its text (if any), then its finish on its own."""
    chunks = [_delta_choice(event.index, {"content": event.text}, None)] if event.text else []
    if event.finish_reason:
        chunks.append(_delta_choice(event.index, {}, event.finish_reason))
    return chunks


async def _collect(events: AsyncIterator[Event], n: int, disconnected: asyncio.Event
                   ) -> tuple[list[str], list[str | None], list[int]]:
    """Every choice's whole text; a client that disconnects first cancels the generation."""
    texts, reasons, tokens = [""] * n, [None] * n, [0] * n

    async def gather() -> None:
        async for event in events:
            texts[event.index] += event.text
            tokens[event.index] = event.num_output_tokens
            if event.finish_reason:
                reasons[event.index] = event.finish_reason

    async with _closing(events):
        work = asyncio.create_task(gather())
        gone = asyncio.create_task(disconnected.wait())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                # Let the cancelled task leave the generator before it is closed.
                await asyncio.wait({work})
        if work.cancelled():
            raise ClientDisconnected()
        work.result()  # an APIError raised while generating
    return texts, reasons, tokens  # type: ignore[return-value]


class _closing:
    """`contextlib.aclosing`, for an async generator that may not have started."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    async def __aenter__(self) -> Any:
        return self.generator

    async def __aexit__(self, *exc: object) -> None:
        await self.generator.aclose()


def _api_error(err: BaseException) -> BaseException:
    """The HTTP error a failure to admit or run a request should produce."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, InvalidRequestError):
        param = "prompt" if err.field.startswith("prompt") else err.field
        return invalid(param, err.message)
    if isinstance(err, EngineOverloadedError):
        return APIError(429, str(err), type="rate_limit_exceeded", code="rate_limit_exceeded",
                        headers={"Retry-After": str(err.retry_after_s)})
    if isinstance(err, EngineDeadError):
        return APIError(503, str(err), type="service_unavailable", code="engine_unavailable",
                        headers={"Retry-After": "5"})
    return err


def _finish_reason(output: RequestOutput) -> str | None:
    if not output.finished:
        return None
    return output.finish_reason if output.finish_reason in ("stop", "length") else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _delta_choice(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
