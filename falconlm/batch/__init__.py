"""Batch jobs in the OpenAI Batch format that survive crashes: a SQLite (WAL) job store and an exactly-once runner.

``jsonl`` validates input lines one at a time and shapes output/error lines; ``store`` keeps jobs, requests
and files; ``runner`` ingests, runs requests on the engine through the server's completion code, and writes
results; ``routes`` serves ``/v1/files`` and ``/v1/batches``. The CLI is ``falconlm batch`` (cli/batch.py).
"""
