"""``falconlm serve``'s embedding options: which task the model serves and how embeddings are pooled."""

from __future__ import annotations

import argparse

from ..engine.pooling import POOLING_TYPES, TASKS


def add_embedding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        choices=TASKS,
        default="generate",
        help="generate (default): completions, chat and /v1/embeddings; embed: /v1/embeddings only, the "
        "generation routes answer 400",
    )
    p.add_argument(
        "--pooling",
        choices=POOLING_TYPES,
        default=None,
        help="how /v1/embeddings pools the final hidden states (default: the checkpoint's sentence-transformers "
        "modules.json and 1_Pooling/config.json, else last)",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise embeddings (default: as the checkpoint's sentence-transformers modules say, else yes)",
    )
