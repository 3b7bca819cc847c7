"""Chat templates under limits: a template that hangs, allocates gigabytes or fails is refused at load in
one line; every later render stays bounded in time and size; ordinary templates give transformers' text.

The templates below are written for these tests; each uses the features published chat templates rely on
(system defaults, tools as JSON, namespaces, reversed loops, splitting out reasoning, alternation checks
with raise_exception, content parts, {% generation %}, loop controls, macros).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import transformers
from jinja2.exceptions import SecurityError, TemplateError
from tokenizers import Tokenizer, models, pre_tokenizers

from models.chat_template import (ChatTemplateError, RenderLimits, TemplateLimitError, check_chat_template,
                                  render_chat)
from models.checkpoint import CheckpointError, load_tokenizer
from pipeline.captioning import enhance_captions

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<|video_pad|>"]
WORDS = "you are a helpful assistant describe this video what moves the red square left think so".split()

QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}{{- message.content }}{%- else %}
            {%- for part in message.content %}
                {%- if part.type == 'video' %}<|video_pad|>{%- elif 'text' in part %}{{- part.text }}{%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + (message.content if message.content is string else '') + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

REASONING = """{%- set ns = namespace(last_user=messages|length - 1, seen=false) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if not ns.seen and message.role == 'user' %}{%- set ns.last_user = index %}{%- set ns.seen = true %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
            {{- content + '<|im_end|>\\n' }}
        {%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}
    {%- else %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

ALTERNATING = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}\
{% set system = false %}{% endif %}\
{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if message['role'] == 'user' %}{% if loop.first and system %}\
{{ '[INST] ' + system + '\\n\\n' + message['content'] | trim + ' [/INST]' }}\
{% else %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% endif %}\
{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}"""

PARTS = """{% macro turn(role) %}{{ role | upper }}:{% endmacro %}\
{% for message in messages %}{{ turn(message['role']) }} \
{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>
{% endfor %}{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}\
{% if not loop.last %} {% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"""

MIXED = """{%- set roles = dict(user='U', assistant='A', system='S') %}
{%- for message in messages %}
    {%- if loop.index > 6 %}{% break %}{% endif %}
    {%- if message.role == 'assistant' %}
        {%- generation %}{{ '%s> %s' | format(roles[message.role], message.content) }}{% endgeneration %}
    {%- else %}{{ '{}> '.format(roles[message.role]) ~ (message.content if message.content is string
        else message.content | tojson(indent=2)) }}{% endif %}
    {{- '\\n' if not loop.last else '' }}
{%- endfor %}
{%- if tools %}{{ '\\n' ~ tools | tojson(sort_keys=true) }}{% endif %}
{%- if add_generation_prompt %}{{ '\\n' + 'A> ' * 1 }}{% endif %}"""

TEMPLATES = {"qwen_tools": QWEN_TOOLS, "reasoning": REASONING, "alternating": ALTERNATING, "parts": PARTS,
             "mixed": MIXED}

TEXT_CHAT = [{"role": "system", "content": "you are a helpful assistant"},
             {"role": "user", "content": "describe this video"},
             {"role": "assistant", "content": "<think>\nthe red square\n</think>\n\na red square", "tool_calls": None},
             {"role": "user", "content": "what moves"}]
PARTS_CHAT = [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                           {"type": "text", "text": "what moves"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "the red square"}]},
              {"role": "user", "content": [{"type": "text", "text": "left"}]}]
REASONING_CHAT = [{"role": "user", "content": "what moves"},
                  {"role": "assistant", "content": "the red square", "reasoning_content": "think so"},
                  {"role": "user", "content": "describe this video"}]
TOOLS = [{"type": "function", "function": {"name": "describe", "description": "what <moves> & where",
                                           "parameters": {"type": "object", "properties": {}}}}]
CASES = {"qwen_tools": [TEXT_CHAT, PARTS_CHAT], "reasoning": [TEXT_CHAT, REASONING_CHAT],
         "alternating": [TEXT_CHAT[1:], TEXT_CHAT], "parts": [PARTS_CHAT], "mixed": [TEXT_CHAT, PARTS_CHAT]}


def save_tokenizer(folder: Path, chat_template: str | None) -> Path:
    """A word-level tokenizer (its specials as added tokens) with ``chat_template``, saved to ``folder``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                                     bos_token="<s>", eos_token="</s>",
                                                     additional_special_tokens=SPECIALS[4:])
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(bounded, transformers') tokenizers of one folder; tests set the chat template on both."""
    folder = save_tokenizer(tmp_path_factory.mktemp("tok"), TEMPLATES["qwen_tools"])
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ordinary_templates_render_as_transformers_does(tokenizers, name):
    bounded, reference = tokenizers
    bounded.chat_template = reference.chat_template = TEMPLATES[name]
    check_chat_template(TEMPLATES[name], dict(reference.special_tokens_map))
    for chat in CASES[name]:
        for options in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                        {"add_generation_prompt": True, "tools": TOOLS, "enable_thinking": False}):
            expected = reference.apply_chat_template(chat, tokenize=False, **options)
            assert bounded.apply_chat_template(chat, tokenize=False, **options) == expected, (chat, options)
            ids = reference.apply_chat_template(chat, return_dict=False, **options)
            assert bounded.apply_chat_template(chat, return_dict=False, **options) == ids
            assert bounded.apply_chat_template(chat, **options)["input_ids"] == ids
        assert bounded.apply_chat_template([chat, chat], tokenize=False) == \
            reference.apply_chat_template([chat, chat], tokenize=False)


def test_a_template_raising_for_a_conversation_raises_the_same_error(tokenizers):
    bounded, reference = tokenizers
    bounded.chat_template = reference.chat_template = ALTERNATING
    broken = [TEXT_CHAT[1], TEXT_CHAT[1]]
    with pytest.raises(TemplateError, match="roles must alternate"):
        reference.apply_chat_template(broken, tokenize=False)
    with pytest.raises(TemplateError, match="roles must alternate"):
        bounded.apply_chat_template(broken, tokenize=False)


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "more than 1000000 loop iterations"),
    ("{{ 'x' * 3000000000 }}", "3000000000 characters, over the limit of 4000000"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}{{ raise_exception('this checkpoint is broken') }}",
     "TemplateError: this checkpoint is broken"),
    ("{% for m in messages %}{{ m.content }}", "TemplateSyntaxError: line 1: Unexpected end of template"),
    ("{{ messages[0].content.no_such_method() }}", "fails on a plain one-turn conversation (UndefinedError"),
])
def test_a_template_that_hangs_allocates_or_fails_fails_the_load_in_one_line(tmp_path, template, message):
    folder = save_tokenizer(tmp_path, template)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as exc:
        load_tokenizer(folder)
    assert time.monotonic() - started < 5
    text = str(exc.value)
    assert "\n" not in text and f"the chat template in {folder} cannot be used" in text and message in text, text


def test_every_render_is_bounded_not_only_the_first(tmp_path):
    """A template that passes the load's test conversations but blows up on some later conversation."""
    template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                "{% if messages | length > 2 %}{% for i in range(3000) %}{% for j in range(3000) %}"
                "{% endfor %}{% endfor %}{% endif %}"
                "{% if messages[-1].content == 'BOOM' %}{{ 'BOOM' * 2000000 }}{% endif %}")
    tokenizer = load_tokenizer(save_tokenizer(tmp_path, template))
    assert tokenizer.apply_chat_template(TEXT_CHAT[:2], tokenize=False) == \
        "you are a helpful assistantdescribe this video"
    with pytest.raises(TemplateLimitError, match="loop iterations"):
        tokenizer.apply_chat_template(TEXT_CHAT, tokenize=False)
    with pytest.raises(TemplateLimitError, match="8000000 characters"):
        tokenizer.apply_chat_template([{"role": "user", "content": "BOOM"}], tokenize=False)


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro grow(s, n) %}{{ grow(s + s, n - 1) if n else s | length }}{% endmacro %}{{ grow('x', 40) }}",
    "{% set s %}{% for i in range(200) %}{{ 'x' * 100000 }}{% endfor %}{% endset %}{{ s | length }}",
    "{{ ('x' * 1000000) | replace('x', 'yyyyy') }}",
    "{{ ('x' * 1000000).replace('x', 'yyyyy') }}",
    "{{ 'x'.ljust(3000000000) }}",
    "{{ 'x' | center(3000000000) }}",
    "{{ ('x\\n' * 1000000) | indent(10) }}",
    "{{ (['x'] * 1000000) | join('y' * 100) }}",
    "{{ ('y' * 100).join(['x'] * 1000000) }}",
    "{{ '%3000000000s' % 'x' }}",
    "{{ '{:>3000000000}'.format('x') }}",
    "{{ 'x' | batch(3000000000, 'y') | list }}",
    "{{ 10 ** 100000000 }}",
    "{{ (1).to_bytes(3000000000, 'big') }}",
    "{% for a in 'x' * 3000 %}{% for b in 'x' * 3000 %}{% endfor %}{% endfor %}",
])
def test_ways_to_grow_a_value_or_loop_are_all_bounded(template):
    started = time.monotonic()
    with pytest.raises(TemplateLimitError):
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 2


def test_time_and_output_limits(tmp_path):
    limits = RenderLimits(seconds=0.3, chars=1000, iterations=10 ** 9)
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match="longer than 0.3 s"):
        render_chat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", [],
                    limits=limits)
    assert time.monotonic() - started < 1
    with pytest.raises(TemplateLimitError, match="a prompt of 1001 characters"):
        render_chat("{% for i in range(1001) %}x{% endfor %}", [], limits=limits)
    assert render_chat("{% for i in range(1000) %}x{% endfor %}", [], limits=limits) == "x" * 1000
    with pytest.raises(ChatTemplateError, match="longer than 0.3 s"):
        check_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                            limits=limits)


@pytest.mark.parametrize("template, error", [
    ("{{ ''.__class__.__mro__ }}", SecurityError),
    ("{{ messages.append(1) }}", SecurityError),
    ("{% set ns = namespace(_secret=1) %}", SecurityError),
    ("{{ lipsum(100000) }}", TemplateError),
])
def test_the_sandbox_still_holds(template, error):
    with pytest.raises(error):
        render_chat(template, [])


def test_objects_in_messages_reach_the_template_as_plain_data():
    class Frame:
        def write(self, path: str) -> None:
            raise AssertionError("a template must not reach an object's methods")

    messages = [{"role": "user", "content": [{"type": "image", "image": Frame()}, {"type": "text", "text": "hi"}],
                 "name": None}]
    rendered = render_chat("{% for p in messages[0].content %}{{ p.image }}{{ p.text }}{% endfor %}"
                           "{{ messages[0].name is defined }}", messages)
    assert rendered == "<Frame>hiFalse"


def test_enhancement_refuses_a_template_that_cannot_make_its_prompt_before_any_row(tmp_path):
    folder = save_tokenizer(tmp_path / "model", "{% for m in messages %}{% if 'wooden' in m.content %}"
                                                "{{ raise_exception('no furniture') }}{% endif %}{{ m.content }}"
                                                "{% endfor %}")
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    csv_path, out = tmp_path / "meta.csv", tmp_path / "out.csv"
    pd.DataFrame({"path": ["a.mp4", "b.mp4"], "text": ["a red square", "a blue circle"]}).to_csv(csv_path, index=False)
    with pytest.raises(SystemExit) as exc:
        enhance_captions.main([str(csv_path), "--pretrained_model_name_or_path", str(folder), "--template", "concise",
                               "--output", str(out), "--device", "CPU"])
    message = str(exc.value)
    assert message.startswith("error: the chat template in") and "no furniture" in message and "\n" not in message
    assert not out.exists() and not list(tmp_path.glob("out.csv.part*"))
