"""``python -m arrcoc``: the ``arrcoc`` command."""

from .cli import main

raise SystemExit(main())
