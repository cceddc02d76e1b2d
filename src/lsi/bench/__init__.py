"""Benchmarks against ground truth: locate methods graded on the organisms' planted components."""
