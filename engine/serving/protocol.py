"""The OpenAI request bodies the server accepts, and its OpenAI-style errors.

Requests are checked strictly, as OpenAI's own API does: a wrong type or an unknown field is a 400
that names the field, never a silent coercion. Extensions shared with vLLM (`top_k`,
`ignore_eos`, `stop_token_ids`, `priority`) are accepted; OpenAI parameters the engine cannot
honour (log-probabilities, penalties, logit bias, tools) are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 64  # choices per request: each is a sequence in the engine
MAX_TEMPERATURE = 2.0  # OpenAI's bound: above it the distribution is near uniform, and no use
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI's seed


class APIError(Exception):
    """An error the client should see, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    """A 400 naming `param`, whose message starts with it too."""
    text = message if message.startswith(f"{param} ") else f"{param}: {message}"
    return APIError(400, text, param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """What completions and chat share: sampling, stopping, streaming and the extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions, with vLLM's names and meanings.
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def refuse_unsupported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise invalid(name, "penalties are not supported by this server; omit it or send 0")
        if self.logit_bias:
            raise invalid("logit_bias", "not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Any
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> list[str] | list[list[int]]:
        """One prompt or a batch: text, token ids, or a list of either (OpenAI's four forms)."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return value
            if all(_is_token(t) for t in value):
                return [value]
            if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in value):
                return value
        raise ValueError("must be a non-empty string, list of strings, list of token ids or list "
                         f"of token-id lists, got {_preview(value)}")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs is not None:
            raise invalid("logprobs", "not supported by this server")
        if self.suffix:
            raise invalid("suffix", "not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of", f"must equal n ({self.n}) or be omitted, got {self.best_of}")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs is not None:
            raise invalid("logprobs", "not supported by this server")
        if self.tools:
            raise invalid("tools", "tool calling is not supported by this server")
        if self.tool_choice not in (None, "none"):
            raise invalid("tool_choice", "tool calling is not supported by this server")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise invalid("max_completion_tokens", "send max_tokens or max_completion_tokens, not both")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def refuse_lone_surrogates(body: Any) -> None:
    """A 400 naming the field that holds a lone UTF-16 surrogate (JSON's "\\ud800" escape
    decodes to one): no tokenizer can encode it. Walked without recursion, however deep."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise invalid(path or "body", f"holds a lone UTF-16 surrogate ({value[err.start]!r} at "
                                              f"character {err.start}), which is not text") from None
        elif isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))


def parse_request(cls: type[_SamplingRequest], data: Any) -> Any:
    """Validate a decoded JSON body, or raise a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise invalid(param, "unrecognized request argument") from None
        raise invalid(param, f"{_message(first)}, got {_preview(first.get('input'))}") from None
    request.refuse_unsupported()
    return request


def _param(loc: tuple) -> str:
    """`messages[0].content` from pydantic's location, without its union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool", "list[str]", "list[TextPart]") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _message(error: dict) -> str:
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return message[0].lower() + message[1:] if message else message


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
