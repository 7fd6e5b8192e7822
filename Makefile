# Two commands for a fresh Linux machine (see README.md):
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml setup.py Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0" numpy "triton" pytest pytest-benchmark hypothesis pytest-timeout matplotlib "transformers==5.25.0" "accelerate==1.16.0" "lightning==2.6.6"
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VPY) -m gradstats demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q --timeout=900 tests

bench: $(STAMP)
	$(VPY) -m gradstats bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
