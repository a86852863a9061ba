"""``python -m mcsc``: the command line."""

from mcsc.cli import main

raise SystemExit(main())
