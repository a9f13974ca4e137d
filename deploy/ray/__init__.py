"""moepager on Ray Serve: N engine replicas behind one OpenAI endpoint, routed for expert-cache affinity.

Run from the repository root (so ``deploy.ray`` imports): ``serve run deploy/ray/config.yaml``.
"""
