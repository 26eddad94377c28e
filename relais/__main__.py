"""`python -m relais ...`: the `relais` command, as `relais up` starts its children."""

import sys

from relais.cli import main

sys.exit(main())
