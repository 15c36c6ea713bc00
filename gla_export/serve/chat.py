"""Chat messages to prompt text.

When the export carries ``tokenizer_config.json`` with a ``chat_template`` (the checkpoint's,
copied by ``gla-export export``), it is rendered with Jinja2 in a sandbox, as Hugging Face's
``apply_chat_template`` does (``messages``, ``add_generation_prompt=True``, ``bos_token``,
``eos_token``). Otherwise the plain template::

    {system content}\\n\\n            (each system/developer message, when present)
    User: {content}\\n
    Assistant:{content}\\n          (earlier answers, exactly as they were generated)
    Assistant:

and the default stop string ``"\\nUser:"``. An answer is appended without a space so that a
follow-up turn re-reads exactly the tokens that were generated: its prompt then starts with the
previous turn's cached key, and only the new message is prefilled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLAIN_STOP = "\nUser:"


class ChatTemplate:
    def __init__(self, export_dir: Path):
        self.template = None
        self.tokens: dict[str, str] = {}
        path = Path(export_dir) / "tokenizer_config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError:
                config = {}
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: take the default one
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
            if isinstance(source, str):
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self.template = env.from_string(source)
                for k in ("bos_token", "eos_token"):
                    v = config.get(k)
                    self.tokens[k] = v.get("content", "") if isinstance(v, dict) else (v or "")

    @property
    def kind(self) -> str:
        return "tokenizer_config.json" if self.template is not None else "plain"

    @property
    def default_stop(self) -> list[str]:
        return [] if self.template is not None else [PLAIN_STOP]

    def render(self, messages: list[dict[str, Any]]) -> str:
        if self.template is not None:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.tokens)
        parts = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role in ("system", "developer"):
                parts.append(f"{content}\n\n")
            elif role == "user":
                parts.append(f"User: {content}\n")
            else:
                parts.append(f"Assistant:{content}\n")
        parts.append("Assistant:")
        return "".join(parts)
