"""``python -m auxpar`` and ``torchrun -m auxpar`` entry point."""

import sys

from auxpar.cli import main

sys.exit(main())
