import sys

from ditf.cli import main

sys.exit(main())
