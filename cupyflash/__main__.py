"""``python -m cupyflash ...``: the same command as the ``cupyflash`` console script."""
import sys

from .cli import main

sys.exit(main())
