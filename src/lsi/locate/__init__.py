"""Locate: methods that score interpretable objects by how much they matter for a behaviour."""
