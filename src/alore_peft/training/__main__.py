"""``python -m alore_peft.training``: the same as the ``alore-train`` console script."""

from .loop import main

raise SystemExit(main())
