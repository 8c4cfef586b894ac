# `make serve` and `make test` each create or update .venv, install the project, then serve or test.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and pinned: on the dev machines 2.13.0 is a CPU wheel on local disk, while an
# unpinned `torch` would pull a multi-GB CUDA build. Override on a GPU box, e.g. TORCH_SPEC='torch'.
TORCH_SPEC ?= torch==2.13.0
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.press-installed

.PHONY: install serve test test-compat lint format bench fuzz clean device-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/press serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Long runs, not tests: each prints a table and writes JSON + markdown to bench/results/.
bench: $(STAMP)
	$(VENV)/bin/python bench/engine.py --size tiny
	$(VENV)/bin/python bench/compiled.py
	$(VENV)/bin/python bench/prefix_cache.py
	$(VENV)/bin/python bench/ray_serve.py

# Schemathesis against a real server on the built-in model: >= 10,000 generated requests, every check (tests/fuzz/).
fuzz: $(STAMP)
	$(VENV)/bin/python -m tests.fuzz.run --examples $(or $(EXAMPLES),500) --request-timeout $(or $(FUZZ_TIMEOUT),0.5) --workers $(or $(FUZZ_WORKERS),4)

clean:
	rm -rf $(VENV) .pytest_cache

# The oldest supported transformers (5.17, first with DiffusionGemma) in its own venv: the engine, and the chat
# format (template, ResponseParser, tool calls over HTTP).
COMPAT_VENV ?= .venv-compat
test-compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(COMPAT_VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(COMPAT_VENV)/bin/pip install -q --disable-pip-version-check 'transformers==5.17.0'
	$(COMPAT_VENV)/bin/python -m pytest tests/test_equivalence.py tests/test_batching.py tests/test_denoise.py \
		tests/test_detokenizer.py tests/test_chat_format.py tests/test_tools.py

# Wheels for a lent GPU machine (Python 3.12, torch and transformers preinstalled, no registry): what Press and its
# tests need beyond that image, at this venv's versions, into .whl/ (git-ignored) for bench/device_check.sh.
DEVICE_WHEELS := fastapi starlette pydantic pydantic_core annotated-types typing-inspection typing_extensions \
	annotated-doc opentelemetry-api uvicorn sse-starlette llguidance torchao openai httpx2 httpcore2 truststore jiter \
	sniffio anyio jsonschema jsonschema-specifications referencing rpds-py
device-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	for p in $(DEVICE_WHEELS); do v=$$($(PIP) show $$p | sed -n 's/^Version: //p'); \
		$(PIP) download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 -d .whl "$$p==$$v" || exit 1; done
	du -sh .whl
