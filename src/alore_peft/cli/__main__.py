"""``python -m alore_peft.cli``: the ``alore`` command."""

import sys

from . import main

sys.exit(main())
