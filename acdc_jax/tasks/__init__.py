"""Tasks: clean and corrupted prompts, a metric, and a canonical circuit."""
