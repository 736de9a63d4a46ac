"""Structured output in the engine: every constrained output parses and validates (jsonschema), on the embedded
default model and on a random-weight checkpoint, greedy and sampled with several seeds; regex, choice, grammar
and json_object outputs match; grammars compile once per constraint; refusals name the part; the mask keeps a
row's tokens independent of the rest of the batch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from falconlm import LLM, SamplingParams, StructuredOutputParams
from falconlm.engine.sampler import Sampler, apply_transforms
from falconlm.engine.structured_output import GrammarCompiler, canonical_key, closed_objects, grammar_bitmask
from falconlm.model.paged_attention import PagedKVCache

from ..conftest import make_hf_checkpoint

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "address"],
}
ARRAY_OF_ENUMS = {
    "type": "object",
    "properties": {
        "animals": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["fox", "bear", "fish"]},
                    "count": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["kind", "count"],
            },
        }
    },
    "required": ["animals"],
}
NUMBERS = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "ok": {"type": "boolean"},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["score", "ok", "level"],
}
TOP_LEVEL_ARRAY = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 4}
UNION_AND_CONST = {
    "type": "object",
    "properties": {
        "id": {
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "pattern": "^[a-z]{3}$"}]
        },
        "unit": {"const": "kg"},
        "item": {"$ref": "#/$defs/item"},
    },
    "required": ["id", "unit", "item"],
    "$defs": {"item": {"type": "object", "properties": {"sku": {"enum": ["A-1", "B-2"]}}, "required": ["sku"]}},
}
SCHEMAS = {
    "nested": NESTED,
    "array_of_enums": ARRAY_OF_ENUMS,
    "numbers": NUMBERS,
    "top_level_array": TOP_LEVEL_ARRAY,
    "union_ref_const": UNION_AND_CONST,
}
MODES = [
    pytest.param({"temperature": 0.0}, id="greedy"),
    *[pytest.param({"temperature": 1.0, "seed": seed}, id=f"seed{seed}") for seed in (0, 1, 2)],
]
PROMPT = "Once upon a time there was a little fox."


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(max_num_seqs=8)


@pytest.fixture(scope="module")
def random_llm(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, dtype="float32", max_num_seqs=8)


def _constrained(llm: LLM, constraint: StructuredOutputParams, max_tokens: int = 150, n: int = 1, **sampling):
    params = SamplingParams(max_tokens=max_tokens, n=n, structured_output=constraint, **sampling)
    return llm.generate([PROMPT], params)[0].outputs


def _check_json(outputs, schema: dict) -> None:
    for out in outputs:
        assert out.finish_reason == "stop", f"did not finish: {out.text!r}"
        jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_default_model_output_validates(default_llm: LLM, name: str, mode: dict) -> None:
    _check_json(_constrained(default_llm, StructuredOutputParams(json_schema=SCHEMAS[name]), **mode), SCHEMAS[name])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_weights_output_validates(random_llm: LLM, name: str, mode: dict) -> None:
    outputs = _constrained(random_llm, StructuredOutputParams(json_schema=SCHEMAS[name]), max_tokens=300, **mode)
    _check_json(outputs, SCHEMAS[name])


def test_unconstrained_output_is_not_json(default_llm: LLM) -> None:
    """The check above could fail: without the constraint, the model tells a story."""
    text = default_llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0))[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_object_children_and_ignore_eos(default_llm: LLM, random_llm: LLM) -> None:
    outputs = _constrained(random_llm, StructuredOutputParams(json_object=True), n=3, temperature=1.0, seed=5)
    assert len(outputs) == 3
    for out in outputs:
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)
    # The story model never closes a free-form object by itself: a logit_bias towards closing tokens (applied
    # before the mask) makes it, and each child's object still parses.
    tokenizer = default_llm.tokenizer
    closers = {t: 8.0 for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).endswith("}")}
    params = SamplingParams(
        max_tokens=150,
        n=3,
        temperature=1.0,
        seed=5,
        logit_bias=closers,
        structured_output=StructuredOutputParams(json_object=True),
    )
    for out in default_llm.generate([PROMPT], params)[0].outputs:
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text
    # with ignore_eos the grammar still ends the output, at its end token
    (out,) = _constrained(default_llm, StructuredOutputParams(json_schema=NUMBERS), temperature=0, ignore_eos=True)
    assert out.finish_reason == "stop" and out.token_ids[-1] == default_llm.tokenizer.eos_token_id
    jsonschema.validate(json.loads(out.text), NUMBERS)


@pytest.mark.parametrize("llm_name", ["default_llm", "random_llm"])
def test_regex_choice_and_grammar(request, llm_name: str) -> None:
    llm = request.getfixturevalue(llm_name)
    pattern = r"[A-Z][a-z]{2,5}-[0-9]{3}"
    for seed in (0, 1):
        (out,) = _constrained(llm, StructuredOutputParams(regex=pattern), temperature=1.0, seed=seed)
        assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop", out.text
    choices = ["yes", "no", "maybe later"]
    seen = {out.text for out in _constrained(llm, StructuredOutputParams(choice=choices), n=6, temperature=1.0)}
    assert seen <= set(choices)
    lark = 'start: ("red" | "green") " " DIGIT DIGIT\nDIGIT: /[0-9]/'
    gbnf = 'root ::= ("cat" | "dog") "-" [0-9] [0-9]'
    for grammar, shape in ((lark, r"(red|green) [0-9]{2}"), (gbnf, r"(cat|dog)-[0-9]{2}")):
        (out,) = _constrained(llm, StructuredOutputParams(grammar=grammar), temperature=1.0, seed=3)
        assert re.fullmatch(shape, out.text), out.text


def test_preemption_keeps_the_grammar_state(tiny_checkpoint: Path) -> None:
    """A KV pool of 40 blocks of 4 tokens for four requests of ~60 tokens: requests are preempted and recomputed,
    and their outputs still validate and equal those of a roomy engine."""
    constraint = StructuredOutputParams(json_schema=ARRAY_OF_ENUMS)
    params = [SamplingParams(max_tokens=100, temperature=1.0, seed=s, structured_output=constraint) for s in range(4)]
    roomy = LLM(tiny_checkpoint, dtype="float32")
    cfg = roomy.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, 4, cfg.num_kv_groups, cfg.head_dim, 4)
    expected = roomy.generate([PROMPT] * 4, params)
    tight = LLM(tiny_checkpoint, dtype="float32", block_size=4, max_num_seqs=4, kv_cache_memory=40 * per_block)
    got = tight.generate([PROMPT] * 4, params)
    assert tight.engine.scheduler.num_preemptions > 0
    for a, b in zip(expected, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert b.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(b.outputs[0].text), ARRAY_OF_ENUMS)


def test_grammars_compile_once_per_constraint(default_llm: LLM) -> None:
    grammars = default_llm.engine.grammars
    schema = {"type": "object", "properties": {"k": {"enum": ["cached"]}}, "required": ["k"]}
    before = grammars.num_compiled
    for seed in range(3):
        (out,) = _constrained(default_llm, StructuredOutputParams(json_schema=schema), temperature=1.0, seed=seed)
        assert json.loads(out.text) == {"k": "cached"}
    reordered = {"required": ["k"], "properties": {"k": {"enum": ["cached"]}}, "type": "object"}
    grammars.compile(StructuredOutputParams(json_schema=reordered))  # same canonical key: a cache hit
    assert grammars.num_compiled == before + 1
    assert canonical_key(StructuredOutputParams(json_schema=schema)) == canonical_key(
        StructuredOutputParams(json_schema=reordered)
    )
    grammars.compile(StructuredOutputParams(regex="[0-9]+"))
    assert grammars.num_compiled == before + 2


def test_the_cache_keeps_the_most_recent(default_llm: LLM) -> None:
    compiler = GrammarCompiler(default_llm.tokenizer, default_llm.config.vocab_size, cache_size=2)
    a, b, c = (StructuredOutputParams(choice=[word]) for word in ("a", "b", "c"))
    for constraint in (a, b, a, c):  # a is used again before c comes, so b is the one evicted
        compiler.compile(constraint)
    assert compiler.num_compiled == 3
    compiler.compile(a)
    assert compiler.num_compiled == 3
    compiler.compile(b)
    assert compiler.num_compiled == 4


@pytest.mark.parametrize(
    ("constraint", "part"),
    [
        (StructuredOutputParams(json_schema={"type": "array", "uniqueItems": True}), "'uniqueItems' at /"),
        (
            StructuredOutputParams(json_schema={"type": "object", "properties": {"a": {"not": {"type": "null"}}}}),
            "'not' at /properties/a",
        ),
        (StructuredOutputParams(json_schema={"type": "strin"}), "strin"),
        (StructuredOutputParams(regex="a(b"), "unclosed group"),
        (StructuredOutputParams(regex="(?=x)y"), "look-around"),
        (StructuredOutputParams(grammar="start: missing_rule"), "missing_rule"),
    ],
)
def test_refusals_name_the_part(default_llm: LLM, constraint: StructuredOutputParams, part: str) -> None:
    with pytest.raises(ValueError, match="cannot be enforced") as err:
        default_llm.generate([PROMPT], SamplingParams(max_tokens=4, structured_output=constraint))
    assert part in str(err.value)
    assert not default_llm.engine.has_unfinished()


def test_a_model_without_tokenizer_refuses_constraints(tiny_checkpoint: Path) -> None:
    llm = LLM(tiny_checkpoint, dtype="float32", skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=4, structured_output=StructuredOutputParams(regex="[0-9]+"))
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        llm.generate([[1, 2, 3]], params)
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) >= 1


def test_closed_objects_leaves_open_what_it_must() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}, "c": {"enum": [{"x": 1}]}},
        "allOf": [{"properties": {"d": {"type": "integer"}}}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"] == {"enum": [{"x": 1}]}
    assert "additionalProperties" not in closed["allOf"][0]
    assert closed_objects({"type": "object"}) == {"type": "object"}  # json_object: any keys


def test_mask_is_applied_greedy_and_seeded_and_logprobs_stay_raw() -> None:
    """The sampler's step 4 on hand-made logits: the best token is forbidden, so greedy and every seeded draw
    pick among the allowed ones; logprobs are the raw ones."""
    vocab = 70
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, 5] = 50.0
    bitmask = torch.zeros(3, 3, dtype=torch.int32)
    allowed = [7, 40, 69]
    for token in allowed:
        bitmask[:2, token // 32] |= 1 << (token % 32)
    bitmask[2] = -1  # row 2 is unconstrained
    params = [
        SamplingParams(temperature=0, logprobs=1),
        SamplingParams(temperature=2.0, seed=1, logprobs=1),
        SamplingParams(temperature=0),
    ]
    shaped = apply_transforms(logits, params, [[1]] * 3, [[]] * 3, bitmask)
    assert torch.isinf(shaped[0]).sum() == vocab - len(allowed) and not torch.isinf(shaped[2]).any()
    for seed in range(5):
        params[1] = SamplingParams(temperature=2.0, seed=seed, logprobs=1)
        generators = [None, torch.Generator().manual_seed(seed), None]
        out = Sampler()(logits, params, [[1]] * 3, [[]] * 3, generators, bitmask)
        assert out.token_ids[0] == max(allowed, key=lambda t: logits[0, t]) and out.token_ids[1] in allowed
        assert out.token_ids[2] == 5
        raw = torch.log_softmax(logits[0], -1)
        assert out.logprobs[0].logprob == pytest.approx(raw[out.token_ids[0]].item(), abs=1e-5)
        assert out.logprobs[0].top[0][0] == 5  # the forbidden top token still heads the raw top-N


def test_bitmask_rows_are_independent(default_llm: LLM) -> None:
    grammars = default_llm.engine.grammars
    state = grammars.compile(StructuredOutputParams(choice=["yes", "no"])).new_state()
    vocab = default_llm.config.vocab_size
    alone = grammar_bitmask([state], vocab)
    mixed = grammar_bitmask([None, state, None], vocab)
    assert grammar_bitmask([None, None], vocab) is None
    assert torch.equal(mixed[1], alone[0]) and bool((mixed[0] == -1).all())
    tokens = [t for t in range(vocab) if (int(alone[0, t // 32]) >> (t % 32)) & 1]
    texts = {default_llm.tokenizer.decode([t]) for t in tokens}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("structured-invariant")
    return make_hf_checkpoint(folder, "7b", hidden_size=256, num_hidden_layers=2, max_position_embeddings=512)


def test_constrained_tokens_do_not_depend_on_other_traffic(wide_checkpoint: Path) -> None:
    llm = LLM(wide_checkpoint, dtype="bfloat16", deterministic=True, max_num_batched_tokens=48)
    constraint = StructuredOutputParams(json_schema=ARRAY_OF_ENUMS)
    mine = [
        SamplingParams(max_tokens=200, temperature=0.0, structured_output=constraint),
        SamplingParams(max_tokens=200, temperature=0.8, seed=11, structured_output=constraint),
    ]
    alone = [llm.generate([PROMPT], p)[0].outputs[0].token_ids for p in mine]
    others = [[(5 * i + j) % 300 + 1 for j in range(3 + 7 * i)] for i in range(6)]
    other_params = [SamplingParams(max_tokens=20, temperature=0.7, seed=i, ignore_eos=True) for i in range(6)]
    mixed = llm.generate([PROMPT, *others, PROMPT], [mine[0], *other_params, mine[1]])
    assert [mixed[0].outputs[0].token_ids, mixed[-1].outputs[0].token_ids] == alone
    for out in (mixed[0], mixed[-1]):
        jsonschema.validate(json.loads(out.outputs[0].text), ARRAY_OF_ENUMS)
