"""`python -m prompt_cdm.cli`."""
import sys

from . import main

sys.exit(main())
