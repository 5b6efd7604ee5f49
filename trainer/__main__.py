"""``python -m trainer`` = ``kestrel-train``."""

import sys

from trainer.cli import main

sys.exit(main())
