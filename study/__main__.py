"""`python -m study ...`: run a study (study/run.py)."""

import sys

from study.run import main

sys.exit(main())
