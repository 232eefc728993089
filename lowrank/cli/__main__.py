"""`python -m lowrank.cli ...`, the `lowrank` command; what `accelerate launch -m lowrank.cli STAGE ...` runs."""

import sys

from lowrank.cli import main

sys.exit(main())
