"""The command line: the only place that prints, prompts and chooses exit codes."""
