"""The HTTP gateway ([http]): anonymize-stream, batch-prepare, STOW-RS ingest, /metrics, /healthz, the status page.

app.py routes and the bearer token check; server.py uvicorn in a supervisor thread and the token
file; body.py uploads streamed to disk; stow.py STOW-RS; batches.py batch-prepare and its manifest;
views.py + page.py the status page.
"""
