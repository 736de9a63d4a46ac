"""The scheduling half (scheduler, block pool, KV-cache manager) loads without torch, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_scheduler_block_pool_and_kv_manager_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import falconlm.engine.scheduler, falconlm.engine.block_pool, falconlm.engine.kv_cache_manager\n"
        "import falconlm.engine.stats, falconlm.engine.request\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_check_would_see_torch() -> None:
    code = "import sys\nimport falconlm.engine.runner\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
