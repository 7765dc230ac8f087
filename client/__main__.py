"""`python -m client ...` is the `ice` command."""

import sys

from client.cli import main

sys.exit(main())
