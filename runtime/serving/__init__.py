"""`vlm serve`: an OpenAI-compatible HTTP server (plus Ollama's native endpoints) over loaded models.

Rooms inside: ``settings`` (what the operator chose), ``pool`` (loaded models: LRU within a memory
budget, keep-alive, one worker thread and one bounded queue per model), ``images`` (image URLs from
requests: data URIs, guarded http(s) fetches, a media folder), ``translate`` (OpenAI / Ollama request
shapes -> ``ChatRequest``; chunks -> response shapes), ``metrics`` (Prometheus), ``app`` (the
Starlette routes). Starlette, uvicorn and prometheus-client come with the ``serve`` extra.
See docs/http-api.md for the API and why it is shaped so.
"""
