"""Steer: directions from data, reversible steering objects, weight folding and plain-HF export."""
