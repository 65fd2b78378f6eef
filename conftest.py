# Loads the case-file plugin also where the package is not installed (a GPU host with the repo
# on PYTHONPATH); installed, its entry point has the same name, so it is not loaded twice.
pytest_plugins = ["harness.pytest_plugin"]
