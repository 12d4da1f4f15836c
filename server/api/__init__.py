"""HTTP layer: FastAPI app, OpenAI protocol models, routes, SSE and errors; never touches tensors."""
