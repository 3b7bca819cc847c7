"""Structured captions: ``--schema NAME|FILE`` makes every caption a JSON object that a JSON Schema accepts.

NAME is a preset in ``configs/schemas`` (``hunyuan``, ``opensora``, ``camera_motion``), FILE a JSON Schema
file. Generation is constrained to the schema (``models.constrained``, for every model family), and the
prompt tells the model the fields (:meth:`CaptionSchema.instruction`). A row's ``text`` is the JSON; each
top-level field also gets a ``caption_<field>`` column (lists and objects as JSON text), and the ``schema``
column records the preset's name or the file's name. A caption that ``--max_new_tokens`` cut before its
JSON closed is an error row, never a caption: raise the limit for such schemas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.constrained import GrammarError, JsonGrammar, compile_schema, is_complete
from pipeline.config import CONFIG_DIR, ConfigError

SCHEMA_DIR = CONFIG_DIR / "schemas"
SCHEMA_COLUMN = "schema"
FIELD_PREFIX = "caption_"


def presets() -> list[str]:
    return sorted(path.stem for path in SCHEMA_DIR.glob("*.json"))


class CutCaptionError(ValueError):
    """A structured caption whose JSON did not close within the token limit."""


def _describe(name: str, spec: dict) -> str:
    """One field for the prompt: its name, what it holds, its allowed values."""
    parts = [spec["description"]] if spec.get("description") else []
    if "enum" in spec:
        parts.append("one of " + ", ".join(json.dumps(v) for v in spec["enum"]))
    elif spec.get("type") == "array" and isinstance(spec.get("items"), dict) and "properties" in spec["items"]:
        parts.append("a list of objects with " + ", ".join(f'"{key}"' for key in spec["items"]["properties"]))
    return f'"{name}"' + (f" ({'; '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class CaptionSchema:
    """A schema and the name the ``schema`` column records."""

    name: str
    schema: dict

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.schema.get("properties", {}))

    def columns(self) -> tuple[str, ...]:
        """The output columns a structured run adds."""
        return (SCHEMA_COLUMN, *(FIELD_PREFIX + field for field in self.fields))

    def instruction(self) -> str:
        """What the prompt adds, so the model writes what the grammar allows rather than fighting it."""
        properties = self.schema.get("properties", {})
        if not properties:
            return "Answer with one JSON object."
        described = "; ".join(_describe(name, spec if isinstance(spec, dict) else {}) for name, spec in
                              properties.items())
        return f"Answer with one JSON object with these keys: {described}."

    def grammar(self, tokenizer) -> JsonGrammar:
        """The schema compiled for the checkpoint's tokenizer (ConfigError when the engine cannot read it)."""
        try:
            return JsonGrammar(self.schema, tokenizer)
        except GrammarError as exc:
            raise ConfigError(f"--schema {self.name}: {exc}") from None

    def cells(self, text: str) -> dict[str, str]:
        """The row's schema and field columns from its caption; CutCaptionError if the JSON is incomplete."""
        if not is_complete(text, self.schema):
            raise CutCaptionError(f"the caption's JSON is incomplete ({len(text)} characters): generation reached "
                                  f"--max_new_tokens before the JSON closed; raise --max_new_tokens")
        document = json.loads(text)
        values = document if isinstance(document, dict) else {}
        return {SCHEMA_COLUMN: self.name, **{FIELD_PREFIX + field: _cell(values.get(field)) for field in self.fields}}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def load_schema(value: str) -> CaptionSchema:
    """``--schema``'s value: a preset's name, else a JSON Schema file. One ConfigError line for a missing or
    unreadable file, invalid JSON Schema, or a schema that uses what the grammar engine lacks."""
    preset = SCHEMA_DIR / f"{value}.json"
    path = preset if preset.is_file() else Path(value)
    if not path.is_file():
        raise ConfigError(f"--schema {value}: no such preset ({', '.join(presets())}) or file")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--schema {value}: not a JSON file: {' '.join(str(exc).split())}") from None
    try:
        compile_schema(schema)
    except GrammarError as exc:
        raise ConfigError(f"--schema {value}: {exc}") from None
    return CaptionSchema(path.stem if path == preset else path.name, schema)
