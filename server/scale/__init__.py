"""Serving past one process: N replicas of our engine behind one ingress (Ray Serve, optional).

`routing` (routing keys and the affinity policy), `asgi_bridge` (run our FastAPI app on a
request given as data, merge per-replica metrics) import no Ray and are unit-tested without it;
`ray_router` and `ray_serve` import Ray and are loaded only by `alignserve serve --replicas N`.
"""
