"""The HTTP side of serving, one job a module: the OpenAI server (server.py), its FastAPI app (app.py), response
building (responses.py), how a model's engine replicas are reached (backends.py), replica choice
(replica_choice.py: Serve's request routers; affinity.py: the cache-aware rule; prefix_keys.py, prefix_table.py: what
it keys and remembers) and Prometheus metrics (metrics.py). cluster.router assembles them into a Serve application.
No module here imports torch: the router process holds no model."""
