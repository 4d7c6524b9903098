# The two commands of the README:  make demo  |  make test
.PHONY: setup demo test lint clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/ctlesion demo

test: setup
	.venv/bin/ruff check .
	CTLESION_REQUIRE_REAL_PARTS=1 .venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check .

clean:
	rm -rf work .pytest_cache
