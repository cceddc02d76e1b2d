"""Architecture knowledge as data: one spec per model family, the registry, and the structural probe."""
