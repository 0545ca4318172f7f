"""The `segbook` command: a thin layer that parses arguments and calls the Python API."""
