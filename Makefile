# The two set-up commands of the README, and the pieces they are made of.
.PHONY: run test bootstrap stack-up stack-down stack-status

VENV := .venv/bin

run: bootstrap stack-up
	scripts/run

test: bootstrap stack-up
	$(VENV)/pytest

bootstrap:
	scripts/bootstrap

stack-up:
	$(VENV)/iotflow stack up

stack-down:
	$(VENV)/iotflow stack down

stack-status:
	$(VENV)/iotflow stack status
