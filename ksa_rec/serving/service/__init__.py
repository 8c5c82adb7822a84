"""``ksa-rec serve``: the streaming update as an HTTP service (FastAPI on uvicorn; see README "Serve online")."""
