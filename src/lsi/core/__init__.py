"""The hook engine: sites, bindings, the model wrapper, interventions and steerings, caches and stores."""
