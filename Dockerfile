# CPU image: builds the venv the same way `make serve` does and converts the default model at build time.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make gcc && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY server server
COPY kernels kernels
COPY retrieval retrieval
COPY adapters adapters
COPY bench bench
ENV ALIGNSERVE_CACHE=/models
RUN make model PYTHON=python3.11
EXPOSE 8000
CMD [".venv/bin/alignserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
