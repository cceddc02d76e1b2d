"""Steer methods graded by the ground-truth benchmark, one module per family.

Every module here registers its methods with :func:`lsi.bench.steer_registry.register_steer_method` when
imported; :meth:`lsi.bench.steer_registry.STEER.load <lsi.bench.registry.Registry.load>` imports them all, so a new
module appears in the benchmark without touching the runner.
"""
