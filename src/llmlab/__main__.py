"""`python -m llmlab` is the `llmlab` command."""

from .cli import main

raise SystemExit(main())
