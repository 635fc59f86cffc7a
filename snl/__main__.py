"""``python -m snl`` is the ``snl`` command (also under ``torchrun ... -m snl train``)."""

from .cli import main

raise SystemExit(main())
