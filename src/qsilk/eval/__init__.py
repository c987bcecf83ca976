"""Measurement: FID/KID features, reference re-implementations for comparisons, benchmarks."""
