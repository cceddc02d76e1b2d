"""Locate methods graded by the ground-truth benchmark, one module per family.

Every module here registers its methods with :func:`lsi.bench.registry.register_locate_method` when imported;
:meth:`lsi.bench.registry.LOCATE.load <lsi.bench.registry.Registry.load>` imports them all, so a new module appears
in the benchmark without touching the runner.
"""
