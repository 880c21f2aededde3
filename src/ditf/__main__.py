"""`python -m ditf`: the `ditf` command."""

import sys

from ditf.cli import main

sys.exit(main())
