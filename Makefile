# The two commands a new user needs: `make demo` and `make test`. Both install whatever is missing first.
PORT_DAGSTER ?= 3000
PORT_MLFLOW ?= 5000
PORT_APP ?= 8050
HOST ?= 127.0.0.1

.PHONY: install demo demo-small test test-fast stop app bench

install:
	@bash scripts/install.sh

demo: install
	.venv/bin/freud demo --host $(HOST) --dagster-port $(PORT_DAGSTER) --mlflow-port $(PORT_MLFLOW) --app-port $(PORT_APP)

demo-small: install
	.venv/bin/freud demo --small --host $(HOST) --dagster-port $(PORT_DAGSTER) --mlflow-port $(PORT_MLFLOW) --app-port $(PORT_APP)

test: install
	FREUD_REQUIRE_EXTRAS=1 .venv/bin/python -m pytest -q

stop:
	.venv/bin/freud stop

app: install
	.venv/bin/freud app --host $(HOST) --port $(PORT_APP)
