"""`python -m llama_cpp.server` (with the alias enabled: python -m llama_dsv4.compat enable)."""

import sys

from llama_dsv4.compat.server.cli import main

sys.exit(main())
