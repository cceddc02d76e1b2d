"""Evaluation: task and score types, curve points, ranking metrics and the functional helpers (KL, next-token
NLL, last real index) that organisms, the benchmark and the steer selection share.

It imports only ``lsi.arch``, ``lsi.core`` and ``lsi.errors``: everything above (locate, steer, organisms, bench)
imports it, never the other way round.
"""
