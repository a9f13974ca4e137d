"""moepager cuda_ext."""
