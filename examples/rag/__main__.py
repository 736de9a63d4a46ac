"""``python -m examples.rag {index,ask} ...``: see cli.py."""

from .cli import main

raise SystemExit(main())
