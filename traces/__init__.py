"""moepager traces."""
