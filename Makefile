# The README's two commands. Both set up .venv first (idempotent; seconds when nothing changed).
.PHONY: run test setup
run: setup
	.venv/bin/r1ray sample configs/tiny.yaml
test: setup
	.venv/bin/python -m pytest
setup:
	@scripts/setup.sh
