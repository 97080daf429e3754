"""HTTP edge: FastAPI and pydantic. Never imports torch."""
