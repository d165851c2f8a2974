"""`python -m pyminigpt` runs the `pyminigpt` command."""

import sys

from .cli import main

sys.exit(main())
