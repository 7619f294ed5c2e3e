"""The `aptp` command: `main.py` builds the parser; each subcommand has its own module and imports its subsystem
lazily, so `aptp --help` stays instant."""
