"""Analysis of encoding mismatch: spectral diagnostics math, feature collection, plots, Ray tasks."""
