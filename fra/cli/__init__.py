"""Command-line interface: `fra <command> ...`."""
