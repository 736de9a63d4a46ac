"""``falconlm generate`` (one prompt, streamed) and ``falconlm chat`` (multi-turn, streamed)."""

from __future__ import annotations

import argparse
import sys
import time

from .options import add_model_options, add_sampling_options, check_model_path, sampling_params
from .parallel import add_parallel_options, distributed_timeout, join_group, leave_group, run_follower

CHAT_STOPS = ["\nUser:", "\nUser"]  # keep the built-in template's model from writing the user's turn


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt, streaming it to stdout",
        description="Generate a continuation of PROMPT and stream it to stdout.",
    )
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr at the end")
    add_parallel_options(p)
    p.set_defaults(run=run_generate)

    c = sub.add_parser(
        "chat",
        help="interactive multi-turn chat (Ctrl-D or /exit to leave)",
        description="Chat with the model through its chat template. Ctrl-D or /exit leaves.",
    )
    add_model_options(c)
    add_sampling_options(c, max_tokens=256)
    c.add_argument("--system", default=None, help="an optional system message")
    c.set_defaults(run=run_chat)


def _load(args: argparse.Namespace):
    check_model_path(args.model)
    from ..llm import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        deterministic=args.deterministic,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        distributed_timeout_s=distributed_timeout(args) if hasattr(args, "distributed_timeout") else 120.0,
    )


def run_generate(args: argparse.Namespace) -> int:
    if join_group(args) > 0:  # a follower rank: rank 0 reads the prompt and prints
        from ..engine.factory import EngineArgs

        check_model_path(args.model)
        settings = EngineArgs(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            deterministic=args.deterministic,
            tensor_parallel_size=args.tensor_parallel_size,
            distributed_timeout_s=distributed_timeout(args),
        )
        return run_follower(settings, "generate")
    try:
        return _generate(args)
    finally:
        leave_group()


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    params = sampling_params(args)
    llm = _load(args)
    try:
        return _stream(args, llm, prompt, params)
    finally:
        llm.engine.close()  # under tensor parallelism the other ranks stop and exit 0


def _stream(args: argparse.Namespace, llm, prompt: str, params) -> int:
    if not args.no_echo:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    start, pieces = time.perf_counter(), 0
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces += 1
    sys.stdout.write("\n")
    if args.stats:
        elapsed = time.perf_counter() - start
        print(f"[{pieces} pieces in {elapsed:.2f}s]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args, extra_stop=CHAT_STOPS)
    llm = _load(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print("Chatting with the model. Ctrl-D or /exit to leave.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(llm.chat_prompt(messages), params):
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply.append(piece)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
