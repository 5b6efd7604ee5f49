# Kestrel: the same commands locally and in CI.
#   make test    set up (Debian packages when root, virtualenvs) then run every test
#   make demo    set up, then run the whole loop on embedded defaults (docs/demo.md)
#   make check   ruff + mypy     make bench   benchmarks     make proto   regenerate proto/
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
PY38 ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.8.*/bin/python) $(shell command -v python3.8))
APT_PKGS := python3-venv mosquitto mosquitto-clients gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
            gstreamer1.0-rtsp python3-gi gir1.2-gst-rtsp-server-1.0 chromium fonts-dejavu-core systemd
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export KESTREL_TEST_MODELS ?= $(CURDIR)/.cache/test-models
PYTEST_ARGS ?=

.PHONY: setup system-deps venv test test-py38 test-fast check proto proto-check demo bench push-model clean \
        flash-image jetson-overlay

setup: system-deps $(VENV)/.stamp

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages; run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

$(VENV)/.stamp: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[edge,hub,trainer,dev,litert,jetson]'
	touch $@

# Device interpreter: Python 3.8 with exactly what a Jetson Nano gets (jetson/constraints-jp46.txt).
# No Python 3.8 on the machine: `make test` says so loudly and skips the device run, unless
# KESTREL_REQUIRE_PY38=1 (CI sets it), which makes the missing interpreter an error.
.venv38/.stamp: pyproject.toml jetson/constraints-jp46.txt
	@if [ -z "$(PY38)" ]; then \
	  echo "no Python 3.8 found: install it (pyenv install 3.8, or Ubuntu 20.04's python3.8) to prove the device side" >&2; \
	  if [ "$(KESTREL_REQUIRE_PY38)" = 1 ]; then exit 1; fi; \
	  echo "SKIPPING the Python 3.8 device run (set KESTREL_REQUIRE_PY38=1 to make this an error)" >&2; exit 0; fi
	test -x .venv38/bin/python || $(PY38) -m venv .venv38
	.venv38/bin/python -m pip install -q --upgrade pip
	.venv38/bin/python -m pip install -q -c jetson/constraints-jp46.txt -e '.[edge,tflite-runtime]' pytest pytest-timeout hypothesis
	touch $@

.venv-proto/.stamp:
	$(PY) -m venv .venv-proto
	.venv-proto/bin/python -m pip install -q 'grpcio-tools==1.70.*'
	touch $@

# Generated with protobuf 5.29 gencode: it loads on protobuf 5.29 (Python 3.8 devices) through 7.x.
proto: .venv-proto/.stamp
	.venv-proto/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/kestrel.proto

proto-check: .venv-proto/.stamp
	@tmp=$$(mktemp -d); mkdir -p $$tmp/proto; cp proto/kestrel.proto $$tmp/proto/; \
	(cd $$tmp && $(CURDIR)/.venv-proto/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/kestrel.proto); \
	for f in kestrel_pb2.py kestrel_pb2_grpc.py kestrel_pb2.pyi; do \
	  cmp -s $$tmp/proto/$$f proto/$$f || { echo "proto/$$f is stale: run make proto" >&2; rm -rf $$tmp; exit 1; }; done; \
	rm -rf $$tmp; echo "proto modules are up to date"

test-models: setup
	$(VPY) -m tests.helpers.models --out $(KESTREL_TEST_MODELS)

test: setup .venv38/.stamp proto-check test-models
	$(VPY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-py38

test-py38: .venv38/.stamp test-models
	@if [ ! -f .venv38/.stamp ]; then echo "device suite on Python 3.8: SKIPPED (no Python 3.8 here)" >&2; exit 0; fi; \
	.venv38/bin/python -m pytest tests/test_contracts.py tests/test_config_loader.py tests/test_import_direction.py tests/test_error_tree.py tests/test_module_size.py tests/edge -m 'not needs_tf' -p no:cacheprovider $(PYTEST_ARGS)

check: setup
	$(VPY) -m ruff check proto edge hub trainer demo jetson tests
	$(VPY) -m mypy proto edge hub trainer demo jetson
	$(VPY) -m pytest -q -p no:cacheprovider tests/test_import_direction.py tests/test_error_tree.py tests/test_module_size.py

demo: setup
	$(VPY) -m demo --out demo-out

bench: setup test-models
	$(VPY) -m tests.bench.run --out bench-out

push-model: setup
	$(VPY) -m trainer push-model $(if $(BUNDLE),--bundle $(BUNDLE)) $(if $(RUN),--run $(RUN)) $(if $(KEY),--key $(KEY)) $(if $(HUB),--hub $(HUB)) $(if $(VERSION),--version $(VERSION)) $(if $(DEPLOY),--deploy $(DEPLOY)) \
	  $(if $(TOKEN_FILE),--token-file $(TOKEN_FILE)) $(if $(DEPLOY_TOKEN_FILE),--deploy-token-file $(DEPLOY_TOKEN_FILE)) $(if $(CA),--ca-file $(CA))

# Jetson images (docs/jetson.md). Shell + Python tools under jetson/, run with .venv's Python when it exists
# (then no `setup` runs); without .venv, `setup` makes it first. NVIDIA's tools need root: sudo make ...
#   make flash-image L4T=~/Linux_for_Tegra BOARD=jetson-nano IDENTITY=cam-1.identity.tar [DEVICE=cam-1]
#        [TRUST='keys/signing.pub'] [BUNDLE=model-v1.kbundle] [SDCARD=cam-1.img] [WHEELHOUSE=dir] [DRY_RUN=1]
#   make jetson-overlay BOARD=jetson-nano IDENTITY=cam-1.identity.tar [TRUST=...] [BUNDLE=...] [OUT=overlay.tar]
JETSON_NEEDS := $(if $(wildcard $(VPY)),,setup)
JETSON_PY = $(VPY) -m jetson
JETSON_INPUTS = --board "$(BOARD)" --identity "$(IDENTITY)" --trust $(or $(TRUST),keys/signing.pub) \
	$(if $(BUNDLE),--bundle "$(BUNDLE)") $(if $(WHEELHOUSE),--wheelhouse "$(WHEELHOUSE)")

flash-image: $(JETSON_NEEDS)
	$(JETSON_PY) flash --l4t "$(L4T)" $(JETSON_INPUTS) $(if $(DEVICE),--device "$(DEVICE)") \
	  $(if $(SDCARD),--sd-image "$(SDCARD)") $(if $(JETSON_USER),--user "$(JETSON_USER)") $(if $(DRY_RUN),--dry-run)

jetson-overlay: $(JETSON_NEEDS)
	$(JETSON_PY) overlay $(JETSON_INPUTS) $(if $(OUT),--out "$(OUT)")

clean:
	rm -rf $(VENV) .venv38 .venv-proto .cache build *.egg-info
