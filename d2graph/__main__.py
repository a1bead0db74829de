"""`python -m d2graph` is the `d2graph` command."""

from .cli import main

raise SystemExit(main())
