"""Model organisms: small models trained on synthetic tasks with planted, verified mechanisms."""
