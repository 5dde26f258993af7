"""`python -m gopher_jax serve`: an OpenAI-compatible HTTP endpoint over a trained workdir
(the `serve` extra: FastAPI and uvicorn). app.py: the endpoints; engine.py: the decode loop
sharing steps between requests; batch.py: its device functions; audit.py: the audit log;
protocol.py: request bodies and errors; server.py: start-up, the socket and draining."""
