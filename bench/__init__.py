"""moepager bench."""
