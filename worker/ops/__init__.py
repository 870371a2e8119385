"""One-shot operator commands: dead letters, maintenance, monitoring, the demo."""
