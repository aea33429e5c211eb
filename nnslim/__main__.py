"""``python -m nnslim``."""

import sys

from .cli import main

sys.exit(main())
