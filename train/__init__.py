"""The training recipe of the demo model (not part of the runtime package): `pip install ".[train]"`."""
