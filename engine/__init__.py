"""moepager engine."""
