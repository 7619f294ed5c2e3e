"""The inference server: FastAPI app, settings, per-code scheduler, engine, metrics."""
