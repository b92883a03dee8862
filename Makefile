VENV ?= .venv

.PHONY: venv demo test
venv:
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(VENV)/bin/lorafleet demo

test: venv
	$(VENV)/bin/python -m pytest -q
