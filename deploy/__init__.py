"""Deployment: Docker, compose, Kubernetes manifests and the Ray Serve application (``deploy.ray``)."""
