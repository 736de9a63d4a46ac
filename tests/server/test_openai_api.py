"""The official ``openai`` client against a live server: completions and chat, plain and streaming."""

from __future__ import annotations

import pytest

from .conftest import MODEL_NAME, LiveServer

PROMPT = "Once upon a time there was a little fox"


def test_completion_plain_has_text_usage_and_finish_reason(server: LiveServer):
    client = server.openai()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL_NAME and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason in ("length", "stop") and choice.text
    num_prompt = len(server.engine.tokenizer.encode(PROMPT))
    assert out.usage.prompt_tokens == num_prompt
    assert 1 <= out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == num_prompt + out.usage.completion_tokens


def test_completion_stream_equals_plain(server: LiveServer):
    client = server.openai()
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_prompt_forms_and_n(server: LiveServer):
    client = server.openai()
    ids = server.engine.tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "The bear"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text
    nested = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert nested.choices[0].text == by_text.choices[0].text and len(nested.choices) == 2
    assert many.usage.prompt_tokens == len(ids) + len(server.engine.tokenizer.encode("The bear"))


def test_seed_reproducible_and_n_children_differ(server: LiveServer):
    client = server.openai()
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234, n=2)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # child i uses seed + i
    single = client.completions.create(**{**kwargs, "n": 1, "seed": 1235})
    assert single.choices[0].text == first.choices[1].text


def test_stop_string_cuts_text(server: LiveServer):
    client = server.openai()
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    text = full.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_completion_logprobs_shape_and_echo(server: LiveServer):
    client = server.openai()
    ids = server.engine.tokenizer.encode(PROMPT)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)  # top 3 plus the chosen token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    greedy_top = [max(top.values()) for top in lp.top_logprobs]
    assert lp.token_logprobs == pytest.approx(greedy_top)  # greedy takes the most likely token

    echo = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    choice = echo.choices[0]
    assert choice.text == PROMPT + out.choices[0].text
    elp = choice.logprobs
    assert len(elp.tokens) == len(ids) + 4
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(x is not None for x in elp.token_logprobs[1:])
    assert elp.token_logprobs[len(ids) :] == pytest.approx(lp.token_logprobs)
    assert "".join(elp.tokens[: len(ids)]) == PROMPT

    streamed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True, stream=True
    )
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == choice.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == elp.tokens and offsets == elp.text_offset


def test_chat_plain_stream_n_and_logprobs(server: LiveServer):
    client = server.openai()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    assert plain.object == "chat.completion"
    (choice,) = plain.choices
    assert choice.message.role == "assistant" and choice.message.content
    content = choice.logprobs.content
    assert len(content) == plain.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.bytes is not None and t.logprob <= 0 for t in content)
    assert all(t.token == t.top_logprobs[0].token for t in content)  # greedy

    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        n=2,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    roles = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(r.index for r in roles) == [0, 1]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(m.delta.content or "" for m in mine) == choice.message.content
        assert mine[-1].finish_reason == choice.finish_reason
        assert all(m.finish_reason is None for m in mine[:-1])
    assert chunks[-1].usage.completion_tokens == 2 * plain.usage.completion_tokens


def test_chat_text_parts_and_response_format(server: LiveServer):
    client = server.openai()
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about the fox."}]}]
    flat = [{"role": "user", "content": "Tell me about the fox."}]
    a = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=4, temperature=0)
    b = client.chat.completions.create(model=MODEL_NAME, messages=flat, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    import openai

    # json_object is served now (structured output); a type that does not exist is still refused by name
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=flat, max_tokens=4, response_format={"type": "yaml"})
    assert "response_format" in err.value.body["message"] and err.value.body["param"] == "response_format"


def test_models_tokenize_detokenize(server: LiveServer):
    client = server.openai()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with server.http() as http:
        tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
        assert tok["tokens"] == server.engine.tokenizer.encode(PROMPT) and tok["count"] == len(tok["tokens"])
        assert tok["max_model_len"] == 128
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat["count"] > 1
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}


def test_health_and_metrics(server: LiveServer):
    client = server.openai()
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    with server.http() as http:
        assert http.get("/health", headers={"Authorization": ""}).status_code == 200
        text = http.get("/metrics").text
    for name in (
        "falconlm_time_to_first_token_seconds_bucket",
        "falconlm_inter_token_latency_seconds_bucket",
        "falconlm_e2e_request_latency_seconds_bucket",
        "falconlm_request_queue_time_seconds_bucket",
        "falconlm_num_requests_running",
        "falconlm_num_requests_waiting",
        "falconlm_kv_cache_blocks_in_use",
        "falconlm_prompt_tokens_total",
        "falconlm_generation_tokens_total",
        "falconlm_prefix_cache_hit_tokens_total",
    ):
        assert name in text, name
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["falconlm_prompt_tokens_total"] > 0 and values["falconlm_generation_tokens_total"] >= 3
    assert values["falconlm_e2e_request_latency_seconds_count"] >= 1
