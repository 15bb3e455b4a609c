"""End-to-end suite and the tooling it shares with the runtime tests and the demo."""
