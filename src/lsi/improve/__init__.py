"""Improve: recipes that turn located mechanisms into measured improvements (locate → steer → select on dev →
evaluate on test against baselines → run directory → report → export).

Run one with :func:`lsi.improve.recipe.run_recipe` or ``lsi improve SCENARIO``; ``lsi improve --list`` lists the
scenarios with their data schema and config keys.
"""
