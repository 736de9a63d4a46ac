"""Benchmarks that ship with falconlm: a load generator for OpenAI-compatible completion servers."""

from __future__ import annotations

from .serve_client import BenchResult, RequestRecord, make_prompts, poisson_arrivals, run_benchmark

__all__ = ["BenchResult", "RequestRecord", "make_prompts", "poisson_arrivals", "run_benchmark"]
