"""`python -m studio` → the command line (and `accelerate launch -m studio train …`)."""

import sys

from studio.cli import main

sys.exit(main())
