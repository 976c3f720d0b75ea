"""``python -m robust_enc.cli ...`` (what ``torchrun -m robust_enc.cli`` runs): the ``robust-enc`` command."""

import sys

from robust_enc.cli import main

sys.exit(main())
