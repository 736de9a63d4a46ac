"""Grammar engines for structured output, compared on Falcon's 65k-token vocabulary (CPU, one thread of Python).

For each engine (xgrammar, llguidance, outlines-core) and each JSON schema below, the script measures:

- ``setup_ms``: the one-off tokenizer preprocessing (once per server, not per schema);
- ``compile_ms``: compiling the schema against the vocabulary (once per schema; falconlm caches the result);
- ``mask_us``: computing the allowed-token bitmask at each position while following a valid JSON document
  token by token (the per-token cost inside every decode step of a constrained request), mean and p95;
- ``advance_us``: accepting the sampled token (the grammar state's step).

The document is the schema's example serialized compactly and tokenized with the real Falcon tokenizer, then the
end-of-text token, which each engine must accept only at the end. Run (xgrammar and outlines-core are not falconlm
dependencies: ``pip install xgrammar outlines-core`` first, or pass ``--engines llguidance``):
``python benchmarks/bench_grammar_engines.py [--tokenizer ../shared/data/falcon-tokenizer] [--repeat 3]``.

Measured on the development machine (2 shared CPU cores, no other load control; falcon-tokenizer, 65,024 tokens;
--repeat 3; xgrammar 0.2.9, llguidance 1.9.1, outlines-core 0.2.14; 2026-12-04):

| engine | licence | setup ms | schema | tokens | compile ms | mask us mean | mask us p95 | advance us |
|---|---|---|---|---|---|---|---|---|
| xgrammar | Apache-2.0 | 1371 | nested object | 36 | 6.3 | 5.0 | 7.6 | 36.4 |
| xgrammar | Apache-2.0 | 1371 | array of objects + enum | 96 | 6.8 | 3.3 | 7.4 | 1.1 |
| xgrammar | Apache-2.0 | 1371 | enums + numbers + booleans | 43 | 6.7 | 3.9 | 8.8 | 1.6 |
| llguidance | MIT | 220 | nested object | 36 | 0.9 | 23.1 | 39.4 | 3.1 |
| llguidance | MIT | 220 | array of objects + enum | 96 | 0.9 | 11.6 | 31.9 | 1.5 |
| llguidance | MIT | 220 | enums + numbers + booleans | 43 | 0.9 | 13.9 | 41.0 | 2.1 |
| outlines-core | Apache-2.0 | 113 | nested object | 36 | 48.8 | 44.9 | 98.0 | 0.6 |
| outlines-core | Apache-2.0 | 113 | array of objects + enum | 96 | 87.3 | 25.9 | 86.1 | 0.4 |
| outlines-core | Apache-2.0 | 113 | enums + numbers + booleans | 43 | 40.4 | 29.8 | 92.6 | 0.4 |

(llguidance builds a schema's lexer lazily, on its first mask: its first position costs more and lifts its mean.)

Choice: **llguidance**. By per-token mask cost xgrammar is the fastest (3-5 us mean against llguidance's 12-23 us and
outlines-core's 26-45 us), but all three are far below a decode step (tens of ms for a 1B model on this CPU; see
bench_structured_output.py for the end-to-end overhead), so the mask cost does not decide between the two leaders.
All three licences are permissive (MIT, Apache-2.0) and compatible with falconlm's Apache-2.0. What decides:

- xgrammar declares transformers and (on Linux x86_64) triton as hard dependencies and imports transformers when
  it is imported (2.2 s here). A core dependency on it would put transformers at run time in every install, which
  the architecture rules out (transformers is a test-only reference), and triton's wheel on CPU-only hosts.
- llguidance has no Python dependencies (one Rust wheel, imported in 35 ms), compiles a schema in about 1 ms (7x
  faster than xgrammar, 50x faster than outlines-core: compilation happens while the client waits), reads the
  tokenizer.json directly, and takes JSON Schema, regex and Lark grammars (plus a GBNF converter), so every kind of
  ``StructuredOutputParams`` maps onto it. vLLM ships it as a backend, llama.cpp as a build option.
- outlines-core's masks are the slowest here (p95 near 100 us), its compile is the slowest, and it has no
  context-free grammars (regex and JSON Schema only), so ``grammar`` could not be served.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

LICENCES = {"xgrammar": "Apache-2.0", "llguidance": "MIT", "outlines-core": "Apache-2.0"}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
        },
    },
    "required": ["name", "age", "address"],
}
ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
            },
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["order_id", "status", "items", "tags"],
}
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "confidence": {"type": "number"},
        "label": {"enum": ["yes", "no", "unsure"]},
        "sources": {"type": "array", "items": {"type": "integer"}},
        "flagged": {"type": "boolean"},
    },
    "required": ["answer", "confidence", "label", "sources", "flagged"],
}
CASES: dict[str, tuple[dict, dict]] = {
    "nested object": (
        PERSON,
        {
            "name": "Ada Lovelace",
            "age": 36,
            "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1"},
        },
    ),
    "array of objects + enum": (
        ORDER,
        {
            "order_id": 90210,
            "status": "shipped",
            "items": [
                {"sku": "FAL-7B-GPU", "quantity": 2, "price": 1499.5},
                {"sku": "CABLE-10M", "quantity": 12, "price": 9.99},
                {"sku": "RACK-KIT", "quantity": 1, "price": 120.0},
            ],
            "tags": ["priority", "hospital", "eu-west"],
        },
    ),
    "enums + numbers + booleans": (
        ANSWER,
        {
            "answer": "The contract renews automatically unless notice is given ninety days before expiry.",
            "confidence": 0.87,
            "label": "yes",
            "sources": [3, 14, 15],
            "flagged": False,
        },
    ),
}


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer_json: dict) -> tuple[list[bytes], set[int]]:
    """Every token's bytes by id (byte-level vocabulary), and the ids of the added (special) tokens."""
    decoder = byte_decoder()
    vocab = tokenizer_json["model"]["vocab"]
    out = [b""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        out[i] = bytes(decoder[c] for c in text)
    special = set()
    for added in tokenizer_json["added_tokens"]:
        out[added["id"]] = added["content"].encode()
        special.add(added["id"])
    return out, special


class Engine:
    """One grammar library behind four verbs."""

    name = ""

    def setup(self, tokenizer_dir: Path, eos: int, vocab_size: int) -> None: ...
    def compile(self, schema: dict) -> object: ...
    def matcher(self, compiled: object) -> object: ...
    def fill(self, matcher: object, mask: torch.Tensor) -> None: ...
    def accept(self, matcher: object, token: int) -> bool: ...


class XGrammar(Engine):
    name = "xgrammar"

    def setup(self, tokenizer_dir, eos, vocab_size):
        import xgrammar

        self.xgr = xgrammar
        raw = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        vocab = [""] * vocab_size
        for text, i in raw["model"]["vocab"].items():
            vocab[i] = text
        for added in raw["added_tokens"]:
            vocab[added["id"]] = added["content"]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, mask):
        matcher.fill_next_token_bitmask(mask, 0)

    def accept(self, matcher, token):
        return matcher.accept_token(token)


class LLGuidance(Engine):
    name = "llguidance"

    def setup(self, tokenizer_dir, eos, vocab_size):
        import llguidance

        self.llg = llguidance
        text = (tokenizer_dir / "tokenizer.json").read_text()
        self.tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        # llguidance compiles lazily: the lexer is built when the first matcher is made, so count that here
        self.llg.LLMatcher(self.tokenizer, grammar)
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher, mask):
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.shape[1] * 4)

    def accept(self, matcher, token):
        return matcher.consume_token(token)


class OutlinesCore(Engine):
    name = "outlines-core"

    def setup(self, tokenizer_dir, eos, vocab_size):
        import outlines_core

        self.oc = outlines_core
        raw = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        pieces, special = token_bytes(raw)
        by_bytes: dict[bytes, list[int]] = {}
        for i, piece in enumerate(pieces):
            if i not in special and piece:
                by_bytes.setdefault(piece, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, by_bytes)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, mask):
        matcher.write_mask_into(mask.data_ptr(), mask.numel(), 4)

    def accept(self, matcher, token):
        if token == self.vocabulary.get_eos_token_id():  # the end: allowed in a final state, not a transition
            return matcher.is_finished()
        matcher.advance(token, return_tokens=False)
        return True


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(engine: Engine, tokenizer, eos: int, repeat: int) -> list[dict]:
    rows = []
    for case, (schema, example) in CASES.items():
        ids = [*tokenizer.encode(json.dumps(example, separators=(",", ":"))).ids, eos]
        compile_s = []
        masks, advances = [], []
        for _ in range(repeat):
            compiled, seconds = _timed(lambda: engine.compile(schema))  # noqa: B023
            compile_s.append(seconds)
            matcher = engine.matcher(compiled)
            mask = torch.zeros(1, (engine.vocab_size + 31) // 32, dtype=torch.int32)
            for position, token in enumerate(ids):
                _, seconds = _timed(lambda: engine.fill(matcher, mask))  # noqa: B023
                masks.append(seconds)
                allowed = bool((int(mask[0, token // 32]) >> (token % 32)) & 1)
                if not allowed:
                    raise AssertionError(f"{engine.name}: token {token} at {position} of {case!r} is masked out")
                ok, seconds = _timed(lambda: engine.accept(matcher, token))  # noqa: B023
                advances.append(seconds)
                if ok is False:
                    raise AssertionError(f"{engine.name}: token {token} at {position} of {case!r} was refused")
        masks.sort()
        rows.append(
            {
                "engine": engine.name,
                "schema": case,
                "tokens": len(ids),
                "compile_ms": 1e3 * statistics.median(compile_s),
                "mask_us_mean": 1e6 * statistics.fmean(masks),
                "mask_us_p95": 1e6 * masks[int(0.95 * (len(masks) - 1))],
                "advance_us": 1e6 * statistics.fmean(advances),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "falcon-tokenizer"
    parser.add_argument("--tokenizer", type=Path, default=default, help="a folder with tokenizer.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", nargs="*", default=["xgrammar", "llguidance", "outlines-core"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos = tokenizer.token_to_id("<|endoftext|>")
    engines = {e.name: e for e in (XGrammar(), LLGuidance(), OutlinesCore())}
    rows = []
    print(f"tokenizer {args.tokenizer} ({vocab_size} tokens), repeat {args.repeat}")
    print("| engine | licence | setup ms | schema | tokens | compile ms | mask us mean | mask us p95 | advance us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.engines:
        engine = engines[name]
        engine.vocab_size = vocab_size
        _, setup_s = _timed(lambda: engine.setup(args.tokenizer, eos, vocab_size))  # noqa: B023
        for row in measure(engine, tokenizer, eos, args.repeat):
            row |= {"licence": LICENCES[name], "setup_ms": 1e3 * setup_s}
            rows.append(row)
            print(
                f"| {name} | {row['licence']} | {row['setup_ms']:.0f} | {row['schema']} | {row['tokens']} | "
                f"{row['compile_ms']:.1f} | {row['mask_us_mean']:.1f} | {row['mask_us_p95']:.1f} | "
                f"{row['advance_us']:.1f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
