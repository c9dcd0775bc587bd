"""Chat messages to one prompt, through the model's own Jinja chat template when it has one.

Hugging Face keeps a model's template in `chat_template.jinja` or under `chat_template` in
`tokenizer_config.json`; either is rendered with the variables transformers passes (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`). A model without one, such as the checkpoints
`pilot models make` writes, gets `DEFAULT_TEMPLATE`: plain role-tagged turns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.source = source
        self.template = environment.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def for_model(cls, directory: str | Path, override: str | Path | None = None) -> ChatTemplate:
        """The template of `override` (a file), else the model directory's, else the default."""
        directory = Path(directory)
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        tokens = {"bos_token": _token_text(config.get("bos_token")),
                  "eos_token": _token_text(config.get("eos_token"))}
        if override is not None:
            return cls(Path(override).read_text(), **tokens)
        if (directory / "chat_template.jinja").is_file():
            return cls((directory / "chat_template.jinja").read_text(), **tokens)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(template if isinstance(template, str) else DEFAULT_TEMPLATE, **tokens)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for the assistant's next turn. Raises ValueError when the template
        rejects the conversation (templates call `raise_exception` for, e.g., bad role order)."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token,
                                        raise_exception=_raise)
        except TemplateError as err:
            raise ValueError(f"the chat template could not render these messages: {err}") from err


def _raise(message: str) -> None:
    raise TemplateError(message)
