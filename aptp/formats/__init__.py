"""Folders on disk, each described by a pydantic model and read with checks whose errors name the file: teacher
folders, expert folders, bundles, and the reports that benchmarks and evaluation write."""
