# Two entry points: `make demo` (set up, then run the main job) and `make test`.
# Each creates the virtual environment it needs and fetches the data.

VENV ?= .venv
PY := $(VENV)/bin/python
CHECKOV_VENV ?= .venv-checkov
# Real FashionMNIST for offline machines, Chromium for the UI tests and PostgreSQL for the stack's
# PostgreSQL backend, from Debian/Ubuntu (under CI a test that misses one fails, it does not skip).
SYSTEM_PACKAGES := dataset-fashion-mnist chromium postgresql
PYTEST_ARGS ?=
# The slowest tests are always listed, so that a new slow one shows.
PYTEST = CHECKOV_BIN=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest --durations=15
# Two test files at once (pytest-xdist; a file per worker, so that a module's fixtures are built
# once; tests/conftest.py hands out the longest first and keeps the smoke sweep's readers together).
# On 2 cores the suite takes about 20 min against 30 serially; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
# test-quick: the in-process tests, without those that start services, Ray or a browser, or run
# minutes of subprocesses (the markers in pyproject.toml).
QUICK_TESTS := not stack and not ray and not browser and not slow
# Extra sweep flags for `make demo`, e.g. DEMO_ARGS="--num-samples 2 --max-epochs 1" for a quicker check.
DEMO_ARGS ?=

.PHONY: demo test test-quick venv system-packages checkov clean bench bench-quick bench-tta

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# checkov pins dependencies that clash with mlflow's, so it lives in its own venv.
checkov: $(CHECKOV_VENV)/.installed

$(CHECKOV_VENV)/.installed:
	test -x $(CHECKOV_VENV)/bin/python || python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov>=3.2'
	touch $@

system-packages:
	@missing=""; \
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || missing="$$missing dataset-fashion-mnist"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else \
	    echo "missing system packages:$$missing (install them with apt-get as root)"; exit 1; \
	  fi; \
	fi

demo: venv system-packages
	$(PY) sweeps/architecture_ablation.py --smoke $(DEMO_ARGS)

# The CPU section of BENCHMARKS.md (about 20 minutes on 2 cores; keep the machine otherwise idle).
bench: venv system-packages
	$(PY) -m bench --out BENCHMARKS.md

# A check that the benchmark runs (about 2 minutes; numbers meaningless), into test-artifacts/, not BENCHMARKS.md.
bench-quick: venv system-packages
	$(PY) -m bench --quick --out test-artifacts/BENCHMARKS-quick.md

# BENCHMARKS.md's time-to-accuracy section: every lever over 3 seeds to early stopping (about 25 minutes on 2 cores).
bench-tta: venv system-packages
	$(PY) -m bench.time_to_accuracy --device cpu --out BENCHMARKS.md --results bench/results/tta_cpu.json

# The whole suite (what CI runs, .ci/run).
test: venv checkov system-packages
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The inner loop: the in-process tests only (under 5 minutes on 2 cores).
test-quick: venv checkov system-packages
	$(PYTEST) -m "$(QUICK_TESTS)" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache test-artifacts
