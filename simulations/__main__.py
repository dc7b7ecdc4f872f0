"""`python -m simulations [scenario.yaml] [--out RUN_DIR]`: run a scenario on Flower's simulation engine."""

import sys

from simulations.run import main

sys.exit(main())
