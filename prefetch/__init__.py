"""moepager prefetch."""
