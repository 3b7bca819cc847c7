"""Chat templates rendered under limits of time, size and loop iterations.

A checkpoint's chat template is code from the Hub, run for every prompt. transformers renders it in
jinja2's immutable sandbox, which keeps it away from Python's internals but lets it run forever
(``{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}``) or build a 3 GB
string (``{{ 'x' * 3000000000 }}``). A thread or a subprocess cannot be stopped cleanly mid-render, so
the limits are checked inside the template's own execution, in the same sandbox:

- every ``for`` loop and ``range`` draws from one budget of iterations per render;
- ``*``, ``+``, ``%`` and ``**``, and the string methods and filters that can grow their input
  (``replace``, ``center``, ``join``, ``indent``, ``format``, ``tojson`` ...), are refused before they
  would build a value over the size limit; every other call's, filter's and ``~``'s result is checked
  after it, and so is what a macro, a ``{% set %}`` block or a filter block collects;
- the output is streamed and counted;
- a deadline is checked at each of these steps.

``bound_chat_templates`` (``models.checkpoint.load_tokenizer`` calls it) renders test conversations at
load, so a template that does not compile, fails on a plain conversation or passes a limit fails the
load once, in one line; and it routes the tokenizer's ``apply_chat_template`` through
:func:`render_chat`. Ordinary templates render to transformers' text: the environment has
transformers' options, globals and filters (``lipsum`` aside, which no chat template uses).
"""
from __future__ import annotations

import contextvars
import dataclasses
import json
import re
import time
import types
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, update_wrapper
from typing import Any, Callable, Iterable, Iterator, Sequence

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

MAX_INT_BITS = 1 << 20  # integers a template computes (10 ** 1000000000 would take minutes)
# jinja2 before 3.1.6 has sandbox escapes through str.format (transformers refuses it too)
_JINJA_SAFE = tuple(map(int, re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", jinja2.__version__).groups("0"))) >= (3, 1, 6)


@dataclass(frozen=True)
class RenderLimits:
    """One render's bounds: seconds, characters of any value it builds and of its output, loop iterations."""

    seconds: float = 5.0
    chars: int = 4_000_000
    iterations: int = 1_000_000


DEFAULT_LIMITS = RenderLimits()


class TemplateLimitError(RuntimeError):
    """A chat template passed a render limit (time, size or iterations)."""


class ChatTemplateError(ValueError):
    """A tokenizer's chat template cannot be used; the message is one line."""


@dataclass
class _Budget:
    limits: RenderLimits
    deadline: float
    iterations: int = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template took longer than {self.limits.seconds:g} s to render")

    def tick(self, count: int = 1) -> None:
        self.iterations += count
        if self.iterations > self.limits.iterations:
            raise TemplateLimitError(f"the chat template ran more than {self.limits.iterations} loop iterations")
        self.check_time()

    def check_size(self, size: int, what: str) -> None:
        if size > self.limits.chars:
            raise TemplateLimitError(f"the chat template built {what} of {size} characters, over the limit of "
                                     f"{self.limits.chars}")

    def checked(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict)):
            self.check_size(_size(value, self.limits.chars), "a value")
        return value


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _budget() -> _Budget:
    return _BUDGET.get()


def _shape(value: Any, cap: int) -> tuple[int, int, int]:
    """(characters, items, nesting depth) of a value as text: strings' lengths, one per item and scalar.
    Counting stops once the characters pass ``cap``."""
    size = items = depth = 0
    stack = [(value, 1)]
    while stack and size <= cap:
        item, level = stack.pop()
        items += 1
        depth = max(depth, level)
        if isinstance(item, (str, bytes)):
            size += len(item)
        elif isinstance(item, Mapping):
            size += 2 + len(item)
            stack.extend((part, level + 1) for pair in item.items() for part in pair)
        elif isinstance(item, (list, tuple, set, frozenset)):
            size += 2 + len(item)
            stack.extend((part, level + 1) for part in item)
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 1
        else:
            size += 1
    return size, items, depth


def _size(value: Any, cap: int) -> int:
    return _shape(value, cap)[0]


def _count(value: Any) -> int:
    """``value``'s size, counted just past the render's limit (enough to refuse it)."""
    return _size(value, _budget().limits.chars)


def _text(value: Any) -> str | bytes:
    return value if isinstance(value, (str, bytes)) else str(value)


_NUMBER = re.compile(r"\d+")


def _format_size(fmt: Any, args: Any, cap: int) -> int:
    """A bound of ``fmt`` filled in (printf or str.format style): every field may hold the largest
    argument, padded to the widest number the format or the arguments name."""
    fmt = _text(fmt)
    fmt = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, tuple) else [args]
    numbers = [int(n) if len(n) < 10 else cap + 1 for n in _NUMBER.findall(fmt)]
    numbers += [v for v in values if isinstance(v, int)]
    widest = max(numbers, default=0) + max((_size(v, cap) for v in values), default=0)
    return len(fmt) + (fmt.count("%") + fmt.count("{")) * widest


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    s, old, new = _text(s), _text(old), _text(new)
    hits = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _width(width: Any) -> int:
    return width if isinstance(width, int) else len(_text(width))


def _json_size(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> int:
    size, items, depth = _shape(value, _budget().limits.chars)
    pad = _width(indent) if indent is not None else 0
    between = sum(len(_text(s)) for s in separators) if separators else 2
    return size + items * (depth * pad + between + 1)  # escapes (at most 12 to 1) are checked after


def _wrap_size(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
               break_on_hyphens: bool = True) -> int:
    s = _text(s)
    lines = len(s) // max(width if isinstance(width, int) else 1, 1) + sum(s.count(c) for c in " \t\n\r-") + 1
    return len(s) + lines * len(_text(wrapstring if wrapstring is not None else "\n"))


def _urlize_size(value: Any, trim_url_limit: Any = None, nofollow: bool = False, target: Any = None,
                 rel: Any = None, extra_schemes: Any = None) -> int:
    s = _text(value)
    extra = 50 + len(_text(target or "")) + len(_text(rel or ""))
    return 3 * len(s) + (len(s) // 4 + 1) * extra


# A bound of the result of the filters that can make their input larger, from the filter's own arguments.
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "replace": _replace_size,
    "center": lambda value, width=80: max(len(_text(value)), _width(width)),
    "indent": lambda s, width=4, first=False, blank=False: (
        len(_text(s)) + (_text(s).count("\n") + 1) * _width(width)),
    "wordwrap": _wrap_size,
    "join": lambda value, d="", attribute=None: _count(value) + len(_text(d)) * len(value),
    "format": lambda value, *args, **kwargs: _format_size(value, args or kwargs, _budget().limits.chars),
    "tojson": _json_size,
    "batch": lambda value, linecount, fill_with=None: _width(linecount) * (1 + _count(fill_with)),
    "slice": lambda value, slices, fill_with=None: _width(slices) + _count(value),
    "urlize": _urlize_size,
}

# The same for methods of strings (and bytes), called as ``text.method(...)``.
_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "replace": lambda s, old, new, count=-1: _replace_size(s, old, new, count),
    "center": lambda s, width, fill=" ": max(len(s), width),
    "ljust": lambda s, width, fill=" ": max(len(s), width),
    "rjust": lambda s, width, fill=" ": max(len(s), width),
    "zfill": lambda s, width: max(len(s), width),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(tabsize, 0),
    "join": lambda s, parts: _count(parts) + len(s) * len(parts),
    "format": lambda s, *args, **kwargs: _format_size(s, (*args, *kwargs.values()), _budget().limits.chars),
    "format_map": lambda s, mapping: _format_size(s, mapping, _budget().limits.chars),
    "translate": lambda s, table: len(s) * (1 + _count(table)),
}


def _guard_loop(iterable: Iterable) -> Iterator:
    """Each item a loop takes is an iteration of the render's budget."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _range(*args: int) -> range:
    """jinja2's sandboxed ``range``, its length drawn from the render's iteration budget."""
    numbers = safe_range(*args)
    _budget().tick(len(numbers))
    return numbers


def _bounded_filter(name: str, func: Callable) -> Callable:
    """``func`` with its result bounded: before the call where ``_FILTER_SIZES`` knows how, after it always."""
    estimate = _FILTER_SIZES.get(name)
    skip = int(getattr(func, "jinja_pass_arg", None) is not None)  # the context/environment argument

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.check_time()
        if name == "join" and len(args) > skip and not isinstance(args[skip], Sized):
            args = (*args[:skip], list(_guard_loop(args[skip])), *args[skip + 1:])
        if estimate is not None and len(args) > skip:
            budget.check_size(estimate(*args[skip:], **kwargs), f"the result of the {name} filter")
        return budget.checked(func(*args, **kwargs))

    return update_wrapper(bounded, func)


class _Buffer(list):
    """What a macro, a ``{% set %}`` block or a filter block collects: it never reaches the counted output,
    so its pieces are counted here."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def _add(self, pieces: Sequence[Any]) -> None:
        self.size += sum(len(p) if isinstance(p, str) else len(str(p)) for p in pieces)
        _budget().check_size(self.size, "a block's output")

    def append(self, piece: Any) -> None:
        self._add((piece,))
        super().append(piece)

    def extend(self, pieces: Iterable[Any]) -> None:
        pieces = tuple(pieces)
        self._add(pieces)
        super().extend(pieces)


_LOOP_GUARD = "bounded loop"  # a filter name no template can write


class _GuardedCode(CodeGenerator):
    """Compiles every ``for`` loop through the iteration guard, every ``~`` through the size check and every
    output buffer as a counted one."""

    def visit_Template(self, node: nodes.Template, frame: Any = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")

    def buffer(self, frame: Any) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (templates that mark assistant turns for training masks):
    rendered as its body, as transformers does outside mask computation."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """JSON without HTML escaping (jinja2's own ``tojson`` escapes ``<`` and ``&``), as transformers has it."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without handing the template the ``dict`` class itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` refusing underscore names, which could reach a namespace's internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - as jinja2's: ``namespace(self=...)`` works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        super().__setitem__(name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template sandbox with each growth, loop and call checked against the render's budget."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})
    code_generator_class = _GuardedCode

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.filters[_LOOP_GUARD] = _guard_loop
        del self.globals["lipsum"]
        self.globals.update(range=_range, raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_Dict(), namespace=_Namespace)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.check_time()
        cap = budget.limits.chars
        both_int = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and not both_int and (isinstance(left, int) or isinstance(right, int)):
            times, repeated = (left, right) if isinstance(left, int) else (right, left)
            budget.check_size(max(times, 0) * _size(repeated, cap), "a repeated value")
        elif operator == "*" and both_int and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"the chat template multiplied integers past {MAX_INT_BITS} bits")
        elif operator == "**" and both_int and abs(left) > 1 and right > MAX_INT_BITS // left.bit_length():
            raise TemplateLimitError(f"the chat template raised an integer past {MAX_INT_BITS} bits")
        elif operator == "+" and not both_int:
            budget.check_size(_size(left, cap) + _size(right, cap), "a joined value")
        elif operator == "%" and isinstance(left, (str, bytes)):
            budget.check_size(_format_size(left, right, cap), "a formatted string")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # the double underscores keep the template's keyword arguments from colliding with these names
        budget = _budget()
        budget.check_time()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        if type(owner) in (str, bytes, int):  # a width or count: "x".ljust(10 ** 9), (1).to_bytes(10 ** 9)
            if any(isinstance(v, int) and v > budget.limits.chars for v in (*args, *kwargs.values())):
                raise TemplateLimitError(f"the chat template called {name} with a number over "
                                         f"{budget.limits.chars}")
            if isinstance(owner, (str, bytes)) and name in _METHOD_SIZES:
                if name == "join" and args and not isinstance(args[0], Sized):
                    args = (list(_guard_loop(args[0])), *args[1:])
                budget.check_size(_METHOD_SIZES[name](owner, *args, **kwargs), f"the result of {name}")
        return budget.checked(super().call(__context, __obj, *args, **kwargs))

    def sized(self, value: str) -> str:
        """A ``~`` concatenation's result, checked."""
        _budget().check_size(len(value), "a joined string")
        return value

    def output_buffer(self) -> _Buffer:
        return _Buffer()


_ENVIRONMENT = _BoundedEnvironment()


@lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    if not _JINJA_SAFE:
        raise ImportError(f"chat templates need jinja2 >= 3.1.6, found {jinja2.__version__} (older versions have "
                          f"sandbox escapes); pip install -U jinja2")
    return _ENVIRONMENT.from_string(template)


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types (anything else becomes ``"<TypeName>"``), so the template can
    reach no object's methods; as transformers prepares what a template sees."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if type(value) in (list, tuple) else [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _message(message: Any) -> dict:
    """A message as the template sees it: plain, without keys whose value is None, its reasoning under the
    names templates read (``reasoning_content``, and ``thinking`` for gpt-oss)."""
    message = _plain(message)
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_KEYS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(template: str, messages: Sequence[Any], *, tools: Sequence[dict] | None = None,
                documents: Sequence[dict] | None = None, add_generation_prompt: bool = False,
                limits: RenderLimits = DEFAULT_LIMITS, **variables: Any) -> str:
    """``template`` rendered for ``messages`` (with ``tools``, ``documents``, ``add_generation_prompt`` and
    ``variables`` such as ``bos_token``, as transformers passes them) within ``limits``.

    Raises TemplateLimitError past a limit, jinja2's TemplateError for what the template raises or cannot
    parse, and whatever error its expressions hit (e.g. TypeError).
    """
    budget = _Budget(limits, time.monotonic() + limits.seconds)
    token = _BUDGET.set(budget)
    try:
        compiled = _compiled(template)
        context = dict(_plain(variables), messages=[_message(m) for m in messages], tools=_plain(tools),
                       documents=_plain(documents), add_generation_prompt=add_generation_prompt)
        pieces, size = [], 0
        for piece in compiled.generate(**context):
            size += len(piece)
            budget.check_size(size, "a prompt")
            budget.check_time()
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _BUDGET.reset(token)


TEST_QUESTION = "Describe this video."
# One user turn, its content as text and as content parts, alone and after a system turn: a template
# that renders none of them cannot prompt any captioner.
TEST_CONVERSATIONS = tuple(
    system + [{"role": "user", "content": content}]
    for content in (TEST_QUESTION, [{"type": "text", "text": TEST_QUESTION}])
    for system in ([], [{"role": "system", "content": "You are a helpful assistant."}]))


def _one_line(exc: BaseException) -> str:
    where = f"line {exc.lineno}: " if isinstance(exc, jinja2.TemplateSyntaxError) else ""
    text = exc.message if isinstance(exc, jinja2.TemplateSyntaxError) else str(exc)
    return f"{type(exc).__name__}: {where}{' '.join(str(text).split())}"


def check_chat_template(template: str, variables: dict | None = None, limits: RenderLimits = DEFAULT_LIMITS
                        ) -> None:
    """Raise ChatTemplateError unless ``template`` compiles and renders one of ``TEST_CONVERSATIONS`` within
    ``limits``; a limit passed on any of them fails at once."""
    failures = []
    for messages in TEST_CONVERSATIONS:
        try:
            render_chat(template, messages, add_generation_prompt=True, limits=limits, **(variables or {}))
            return
        except (TemplateLimitError, jinja2.TemplateSyntaxError, RecursionError, ImportError) as exc:
            raise ChatTemplateError(_one_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a template may raise anything on a conversation it rejects
            failures.append(exc)
    raise ChatTemplateError(f"it fails on a plain one-turn conversation ({_one_line(failures[0])})")


def _apply_chat_template(self: Any, conversation: Sequence, tools: Sequence | None = None,
                         documents: Sequence[dict] | None = None, chat_template: str | None = None,
                         add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                         tokenize: bool = True, sanitize_control_tokens: bool = False, padding: Any = False,
                         truncation: bool = False, max_length: int | None = None, return_tensors: Any = None,
                         return_dict: bool = True, return_assistant_tokens_mask: bool = False,
                         tokenizer_kwargs: dict | None = None, **kwargs: Any) -> Any:
    """transformers' ``apply_chat_template`` with the template rendered by :func:`render_chat`."""
    for flag, value in (("continue_final_message", continue_final_message),
                        ("sanitize_control_tokens", sanitize_control_tokens),
                        ("return_assistant_tokens_mask", return_assistant_tokens_mask)):
        if value:
            raise ValueError(f"{flag} is not supported where chat templates render under limits "
                             f"(models/chat_template.py)")
    template = self.get_chat_template(chat_template, tools)
    if not conversation:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    batched = isinstance(conversation[0], (list, tuple))
    if tools is not None:
        from transformers.utils import get_json_schema

        tools = [tool if isinstance(tool, dict) else get_json_schema(tool) for tool in tools]
    variables = {**self.special_tokens_map, **kwargs}
    rendered = [render_chat(template, chat, tools=tools, documents=documents,
                            add_generation_prompt=add_generation_prompt, **variables)
                for chat in (conversation if batched else [conversation])]
    text = rendered if batched else rendered[0]
    if not tokenize:
        return text
    out = self(text, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=False,
               return_tensors=return_tensors, **(tokenizer_kwargs or {}))
    return out if return_dict else out["input_ids"]


def bound_chat_templates(tokenizer: Any) -> Any:
    """Check each of the tokenizer's chat templates (``check_chat_template``; ChatTemplateError names the
    failing one) and make its ``apply_chat_template`` render within ``DEFAULT_LIMITS``; the tokenizer."""
    templates = tokenizer.chat_template
    named = templates.items() if isinstance(templates, dict) else [(None, templates)] if templates else []
    for name, template in named:
        try:
            check_chat_template(template, dict(tokenizer.special_tokens_map))
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"chat template {name!r}: {exc}" if name else str(exc)) from None
    tokenizer.apply_chat_template = types.MethodType(_apply_chat_template, tokenizer)
    return tokenizer
