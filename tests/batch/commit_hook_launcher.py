"""Test-only launcher: ``python -m tests.batch.commit_hook_launcher HOOK_FILE PAUSE_S <falconlm CLI args...>``.

Runs the falconlm CLI with every :class:`~falconlm.batch.store.Store` given an ``on_commit`` hook that appends
``commit <results> <rows marked>`` to HOOK_FILE from inside each result transaction and then sleeps PAUSE_S
seconds before COMMIT, so that a kill sent as soon as a new line appears lands inside the transaction.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from falconlm.batch import store
from falconlm.cli import main


def install_commit_hook(hook_file: Path, pause_s: float) -> None:
    """Make every Store created from now on call the hook (the CLI creates its own)."""
    create = store.Store.__init__

    def append_line(results: int, marked: int) -> None:
        with open(hook_file, "a", encoding="utf-8") as f:
            f.write(f"commit {results} {marked}\n")
        time.sleep(pause_s)

    def init_with_hook(self: store.Store, state_dir, on_commit: store.CommitHook | None = None) -> None:
        create(self, state_dir, on_commit=on_commit or append_line)

    store.Store.__init__ = init_with_hook  # type: ignore[method-assign]


if __name__ == "__main__":
    install_commit_hook(Path(sys.argv[1]), float(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
