# The README's two commands. Both set up .venv first (idempotent; seconds when nothing changed).
.PHONY: run test setup
run: setup
	.venv/bin/r1ray train configs/tiny.yaml run.output_dir=runs/tiny-$$(date +%Y%m%d-%H%M%S)
test: setup
	.venv/bin/python -m pytest
setup:
	@scripts/setup.sh
