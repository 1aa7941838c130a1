"""Chat templates: the real SmolLM2 template from its GGUF, the sandbox, the helpers templates use, BOS."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gguf import GGUFReader

from bindings.protocol import ModelInfo
from registry.models import resolve_model
from server.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, select_chat_template
from server.engine.fake_backend import BOS, FakeBackend, FakeBackendConfig
from server.errors import InvalidRequestError

SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2_template_source() -> str:
    reader = GGUFReader(resolve_model("smollm2-135m-instruct").path)
    source = reader.fields["tokenizer.chat_template"].contents()
    assert isinstance(source, str)
    return source


def test_smollm2_template_renders_chatml_with_its_default_system_prompt(smollm2_template_source: str) -> None:
    template = ChatTemplate(smollm2_template_source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    text = template.render([{"role": "user", "content": "What is 2+2?"}])
    assert text == (
        f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_keeps_a_given_system_prompt_and_history(smollm2_template_source: str) -> None:
    template = ChatTemplate(smollm2_template_source)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not template.render(messages, add_generation_prompt=False).endswith("<|im_start|>assistant\n")


def test_chatml_fallback_matches_the_smollm2_layout(smollm2_template_source: str) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ChatTemplate(CHATML_TEMPLATE).render(messages) == ChatTemplate(smollm2_template_source).render(messages)


def test_sandbox_hides_python_internals() -> None:
    assert ChatTemplate("{{ ''.__class__ }}").render([]) == ""
    with pytest.raises(InvalidRequestError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])


def test_sandbox_forbids_mutating_the_messages() -> None:
    with pytest.raises(InvalidRequestError, match="unsafe"):
        ChatTemplate("{{ messages.append({'role': 'system'}) }}").render([{"role": "user", "content": "x"}])


def test_raise_exception_becomes_a_request_error_with_its_message() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(InvalidRequestError, match="first must be user"):
        template.render([{"role": "system", "content": "x"}])
    assert template.render([{"role": "user", "content": "x"}]) == ""


def test_template_helpers_tojson_strftime_generation_loopcontrols() -> None:
    template = ChatTemplate(
        "{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') | length }}|"
        "{% generation %}gen{% endgeneration %}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['role'] }}{% endfor %}|"
        "{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=True) }}"
    )
    text = template.render([{"role": "user", "content": "<a & b> é"}, {"role": "assistant", "content": ""}])
    assert text == '"<a & b> é"|4|gen|user|{"a": [1, 2], "b": 1}'


def test_a_template_that_does_not_compile_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_runtime_failure_of_the_template_is_a_request_error() -> None:
    with pytest.raises(InvalidRequestError, match="TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])


# 'x' * 2**62 asks for 4 EiB: CPython raises a real MemoryError at once, without touching memory.
OUT_OF_MEMORY_TEMPLATE = "{{ 'x' * 2**62 }}"


def test_out_of_memory_in_the_template_is_not_a_request_error() -> None:
    with pytest.raises(MemoryError):
        ChatTemplate(OUT_OF_MEMORY_TEMPLATE).render([{"role": "user", "content": "x"}])


def test_endless_recursion_in_the_template_is_a_request_error() -> None:
    template = ChatTemplate("{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}")
    with pytest.raises(InvalidRequestError, match="RecursionError"):
        template.render([{"role": "user", "content": "x"}])


@dataclass
class RecordingVocab:
    """A vocab that records how it was asked to tokenize."""

    calls: list[tuple[str, bool, bool]] = field(default_factory=list)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        self.calls.append((text, add_special, parse_special))
        return [1, 2]

    def piece(self, token: int) -> bytes:
        return b""

    def is_eog(self, token: int) -> bool:
        return False

    def token_text(self, token: int) -> str:
        return {1: "<s>", 2: "</s>"}[token]


def _info(*, add_bos: bool, chat_template: str | None = None) -> ModelInfo:
    return ModelInfo(
        name="m",
        architecture="llama",
        n_vocab=10,
        n_ctx_train=64,
        n_slots=1,
        n_ctx_per_slot=64,
        n_batch=64,
        supports_partial_removal=True,
        bos_token=1,
        eos_token=2,
        add_bos=add_bos,
        chat_template=chat_template,
    )


@pytest.mark.parametrize(
    ("add_bos", "source", "expect_add_special"),
    [
        (True, "{{ bos_token }}hello", False),  # the template wrote BOS: adding another would double it
        (True, "hello", True),  # the model wants BOS and the template did not write it
        (False, "hello", False),  # the model wants none
    ],
)
def test_bos_is_added_once_as_llama_cpp_does(add_bos: bool, source: str, expect_add_special: bool) -> None:
    vocab = RecordingVocab()
    info = _info(add_bos=add_bos, chat_template=source)
    template = select_chat_template(info, vocab)
    text = template.render([])
    template.tokenize(text, info, vocab)
    assert vocab.calls == [(text, expect_add_special, True)]
    assert text == source.replace("{{ bos_token }}", "<s>")


def test_fake_backend_prompt_tokens_parse_special_tokens() -> None:
    backend = FakeBackend(FakeBackendConfig())
    template = select_chat_template(backend.info, backend)
    text = template.render([{"role": "user", "content": "hi"}])
    tokens = template.tokenize(text, backend.info, backend)
    assert text.startswith("<|im_start|>")
    assert tokens[0] != BOS and tokens.count(258) == 2  # <|im_start|> parsed as one special token, twice


def test_template_selection_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vocab = RecordingVocab()
    override = tmp_path / "t.jinja"
    override.write_text("override:{{ bos_token }}")
    assert select_chat_template(_info(add_bos=False, chat_template="gguf"), vocab, override).render([]) == (
        "override:<s>"
    )
    assert select_chat_template(_info(add_bos=False, chat_template="gguf"), vocab).render([]) == "gguf"
    assert select_chat_template(_info(add_bos=False), vocab).origin == "chatml"
    broken = select_chat_template(_info(add_bos=False, chat_template="{% if %}"), vocab)
    assert broken.origin == "chatml" and "falling back to ChatML" in caplog.text
    with pytest.raises(ChatTemplateError, match="cannot read"):
        select_chat_template(_info(add_bos=False), vocab, tmp_path / "missing.jinja")


QWEN3_TEMPLATE = Path(__file__).parent.parent / "data" / "templates" / "qwen3.jinja"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_the_qwen3_template_reads_tools_and_thinking_chatml_does_not() -> None:
    qwen3 = ChatTemplate(QWEN3_TEMPLATE.read_text())
    assert qwen3.supports_tools and qwen3.knows_thinking
    chatml = ChatTemplate(CHATML_TEMPLATE)
    assert not chatml.supports_tools and not chatml.knows_thinking


def test_tools_and_variables_reach_the_qwen3_template() -> None:
    template = ChatTemplate(QWEN3_TEMPLATE.read_text())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    text = template.render(messages, tools=[WEATHER_TOOL], variables={"enable_thinking": False})
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert template.render(messages).endswith("<|im_start|>assistant\n")  # thinking on: the model opens it


def test_reserved_variables_cannot_be_replaced() -> None:
    template = ChatTemplate("{{ messages | length }}|{{ add_generation_prompt }}")
    assert template.render(
        [{"role": "user", "content": "x"}], variables={"messages": [], "add_generation_prompt": 0}
    ) == ("1|True")
