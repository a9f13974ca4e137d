"""moepager server."""
