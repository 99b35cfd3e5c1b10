"""llama-cpp-python's `llama_cpp.server` package under the alias: its command line (`python -m llama_cpp.server`,
cli.py), its settings classes (settings.py) and `create_app` (app.py), served by llama-dsv4's server
(llama_dsv4.server). What each of its settings means here: mapping.py; the design: docs/compat.md.

Importing this package imports nothing heavy; FastAPI is imported when an app is made.
"""
