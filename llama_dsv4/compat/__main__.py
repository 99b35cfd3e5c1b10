"""`python -m llama_dsv4.compat enable | disable | status` (see enable.py)."""

import sys

from llama_dsv4.compat.enable import main

sys.exit(main())
