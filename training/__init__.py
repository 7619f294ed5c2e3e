"""Training jobs (teacher, APTP search and fine-tuning, baselines), evaluation, export, and the `aptp` command."""
