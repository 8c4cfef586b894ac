"""Press on Ray Serve: replicas of the Press engine behind one OpenAI endpoint (`press serve --ray`, or Ray's own
`serve run configs/ray/serve.yaml`). Ray is optional: `pip install press[ray]`; nothing here is imported by
`press serve` without `--ray`.

- asgi.py: a replica runs Press's own FastAPI app in-process, so every endpoint behaves exactly as `press serve`.
- routing.py: which replica a request goes to (the one that served the conversation's or prompt's prefix before,
  unless it is much busier than the others; else the least loaded).
- app.py: the deployments (the engine replicas, the HTTP ingress), replica metrics, and the builders.
"""
