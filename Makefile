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

# AddressSanitizer + UBSan run of the native tests. Builds gradstats._C with
# -fsanitize=address,undefined into build/asan (never the in-place library), runs the
# tests from a copy of the package that holds that library, with the sanitizer runtime of
# the same compiler preloaded (python itself is not instrumented), and libstdc++ with it:
# python does not link libstdc++, and without it ASan's __cxa_throw interceptor has no real
# function to call, so the first C++ exception (a TORCH_CHECK) aborts the process.
ASAN_DIR := build/asan
ASAN_CXX ?= c++
ASAN_TESTS := tests/test_native.py tests/test_native_range.py tests/test_native_describe.py
.PHONY: asan
asan: $(STAMP)
	rm -rf $(ASAN_DIR)/pkg && mkdir -p $(ASAN_DIR)/pkg
	CXX=$(ASAN_CXX) GRADSTATS_SANITIZE=address,undefined GRADSTATS_BUILD_CUDA=0 \
	  $(VPY) setup.py -q build_ext --build-lib $(ASAN_DIR)/lib --build-temp $(ASAN_DIR)/temp
	test -f $(ASAN_DIR)/lib/gradstats/_C*.so || { cat $(ASAN_DIR)/lib/gradstats/_ext_status.txt; exit 1; }
	cp -r gradstats $(ASAN_DIR)/pkg/
	rm -f $(ASAN_DIR)/pkg/gradstats/_C*.so $(ASAN_DIR)/pkg/gradstats/_ext_status.txt
	cp $(ASAN_DIR)/lib/gradstats/_C*.so $(ASAN_DIR)/pkg/gradstats/
	cd $(ASAN_DIR)/pkg && \
	  LIBASAN="$$($(ASAN_CXX) -print-file-name=libasan.so)" && test -f "$$LIBASAN" && \
	  LIBSTDCXX="$$($(ASAN_CXX) -print-file-name=libstdc++.so)" && test -f "$$LIBSTDCXX" && \
	  export LD_PRELOAD="$$LIBASAN $$LIBSTDCXX" ASAN_OPTIONS=detect_leaks=0 \
	    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 TRITON_INTERPRET=1 && \
	  $(abspath $(VPY)) -c "import gradstats.backends.native as n, sys; \
	    f = n.extension().__file__; print('sanitized library:', f); \
	    sys.exit(0 if f.startswith('$(abspath $(ASAN_DIR))') else 'not the sanitized build')" && \
	  $(abspath $(VPY)) -m pytest -q -p no:cacheprovider -m "not slow" --timeout=900 \
	    --rootdir=$(CURDIR) $(addprefix $(CURDIR)/,$(ASAN_TESTS))
