"""Where speculation meets vLLM: hooks on its scheduler, engine core, runner and draft proposer (start-up patches)."""
