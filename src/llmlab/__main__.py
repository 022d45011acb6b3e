"""`python -m llmlab` is the `llmlab` command."""

from llmlab.cli import main

raise SystemExit(main())
