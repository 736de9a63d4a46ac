"""Chat templates render within an output-length cap and a time limit, on top of Jinja's sandbox."""

from __future__ import annotations

import pytest

from falconlm import template_limits
from falconlm.template_limits import BoundedSandbox, TemplateLimitError, render_bounded
from falconlm.tokenizer import _render_jinja

CHAT = [{"role": "user", "content": "hi"}]


def _render(source: str, **limits) -> str:
    return render_bounded(BoundedSandbox().from_string(source), {"messages": CHAT}, **limits)


def test_a_normal_template_renders_as_before():
    source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert _render(source) == "<user>hi"


def test_chat_template_that_loops_without_output_is_stopped_by_the_time_limit():
    spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"
    with pytest.raises(TemplateLimitError, match="longer than"):
        _render(spin, timeout=0.2)


def test_chat_template_output_over_the_cap_is_refused():
    flood = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}"
    with pytest.raises(TemplateLimitError, match="over 1000 characters"):
        _render(flood, max_chars=1000)
    assert len(_render(flood)) == 200_000  # under the default cap


@pytest.mark.parametrize("source", ["{{ 'x' * 100000000000 }}", "{{ [1] * 10**10 }}", "{{ 9 ** 999999 }}"])
def test_chat_template_cannot_build_huge_values(source):
    with pytest.raises(TemplateLimitError):
        _render(source)


def test_limits_reach_the_tokenizer_as_a_value_error():
    """The server turns a ValueError from the tokenizer into a 400 naming messages."""
    with pytest.raises(ValueError, match="chat template builds a sequence"):
        _render_jinja("{{ messages[0].content * 10**12 }}", messages=CHAT)
    assert template_limits.MAX_RENDER_SECONDS <= 30
