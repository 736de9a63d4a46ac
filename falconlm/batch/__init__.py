"""Batch jobs in the OpenAI Batch format that survive crashes: a SQLite (WAL) job store and an exactly-once runner.

``jsonl`` validates input lines one at a time and shapes output/error lines; ``store`` keeps jobs, requests
and files (``records`` are its rows); ``ingest`` stores an input file's lines; ``runner`` takes a job through
its states, running each request with ``execute`` (the serving layer's typed responses become output lines);
``outputs`` writes the result files (through ``atomic``). ``service`` is the Files and Batches API without
HTTP, ``protocol`` its objects and ``routes`` its FastAPI router, which ``falconlm.cli.serve_http`` mounts into
the server app. The CLI is ``falconlm batch`` (cli/batch.py).
"""
