"""`vlm serve`: an OpenAI-compatible HTTP server (plus Ollama's native endpoints) over loaded models.

Rooms inside: ``settings`` (what the operator chose), ``pool`` (loaded models: LRU within a memory
budget, keep-alive, one worker thread and one bounded queue per model), ``images`` (image URLs from
requests: data URIs, guarded http(s) fetches, a media folder), ``translate`` (what both API families'
requests share -> ``ChatRequest``), ``openai_api`` / ``ollama_api`` (each family's shapes, writer and
handlers), ``answer`` (the one answer path both call), ``context`` (the server context, the error
boundary), ``metrics`` (Prometheus), ``app`` (the Starlette app). Starlette, uvicorn and prometheus-client come with the ``serve`` extra.
See docs/http-api.md for the API and why it is shaped so.
"""
