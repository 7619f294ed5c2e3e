"""Small command-line helpers that are not benchmarks (see each module's docstring)."""
