"""genserve on Ray Serve: `genserve serve --ray` (`pip install genserve[ray]`).

genserve.ray.deploy holds the deployments and imports Ray only when it runs;
genserve.ray.bridge carries HTTP over Ray handles and never imports Ray.
"""
