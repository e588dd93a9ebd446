"""Serving: one shared base model, every tenant's adapters, an OpenAI-compatible API.

- ``engine.py``: the base model + named LoRA adapters + token-by-token generation (no Ray)
- ``backend.py``: how the API reaches an engine: in-process, or adapter download/pinning helpers
- ``api.py``: the FastAPI app (OpenAI routes, tenant keys, adapter resolution; no Ray)
- ``app.py``: the Ray Serve wiring (ingress + multiplexed engine deployment)
"""
