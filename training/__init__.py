"""Training scripts for the demo models and adapters the project ships."""
