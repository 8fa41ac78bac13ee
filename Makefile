# Each target sets up .venv itself (python3 -m venv + pip install -e '.[test]'), so both work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tmpq-installed

.PHONY: setup sysdeps demo test baseline clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) sysdeps

# Debian packages that two tests need: PostgreSQL's server (the Optuna engine's PostgreSQL test starts a throwaway
# server on loopback) and Chromium (the report test renders report.html headless). Installed only when missing;
# without apt-get (or root / sudo) those tests are skipped with a reason, not failed.
sysdeps:
	@missing=; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "note: no apt-get here; install$$missing by hand, else their tests are skipped"; \
	else \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
		{ $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; } \
			|| echo "note: could not install$$missing from Debian; their tests will be skipped"; \
	fi

# Main job on the embedded default: calibrate the supernet, search (200 evaluations under the W6A6 budget), validate the 3 best points
# under the W6A6 budget (FID at N=2,000 x 2 seeds), export the best, write the report (about 6 min on a Zen 4 EPYC, 2 cores; other CPUs: see README).
# Rerunning resumes; `make clean` removes it.
demo: $(STAMP)
	$(BIN)/tmpq run --config configs/demo.toml --run-dir results/runs/demo

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q

# The committed baseline report (results/baseline/); about 2 h on 2 cores, resumable.
baseline: $(STAMP)
	$(BIN)/python -m benchmarks.baseline --n 10000 --steps 5,10,20,50,100

clean:
	rm -rf $(VENV) results/demo results/runs/demo
