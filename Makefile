# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs: Debian packages (as root, or through sudo) and a venv in .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dnsmasq-base postfix dovecot-core dovecot-pop3d openssh-server swaks iproute2 python3-venv prometheus \
	cron bsd-mailx php-cli git git-email opendkim-tools \
	nsd unbound bind9-utils bind9-dnsutils
# The systemd path (tests/ansible/test_systemd_role.py, tests/lab/test_manpages.py): systemd-nspawn boots a
# cached Debian root (built once under .cache/ by deliverd_lab.sdbox); systemd-analyze and
# man check the unit and its manual pages. Installing these starts no service.
APT_PACKAGES += systemd systemd-container debootstrap man-db
PYTEST_ARGS ?=
# Test processes (pytest-xdist). Most tests wait on servers, subprocesses and timers more than
# they compute, so a few more workers than cores keeps both cores busy.
PYTEST_WORKERS ?= 4
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=25

.PHONY: demo test lint typecheck pytest test-unit test-lab test-ansible system-deps venv clean

demo: system-deps venv
	$(BIN)/python examples/demo.py

test: system-deps venv lint typecheck pytest

lint: venv
	$(BIN)/ruff check engine tests bench examples

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(PYTEST) $(PYTEST_ARGS)

# One part of the suite alone: tests/unit (no servers), tests/lab (real servers on loopback
# and in network namespaces), tests/ansible (the role, the collection, molecule, systemd).
test-unit: venv
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-lab: system-deps venv
	$(PYTEST) tests/lab $(PYTEST_ARGS)

test-ansible: system-deps venv
	$(PYTEST) tests/ansible $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Postfix asks a debconf question on install: answer "No configuration" (the tests run their own).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The manual pages in man/man8, from the CLI's own parser (tests/lab/test_manpages.py checks them).
.PHONY: man
man: venv
	$(BIN)/python man/generate.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# An installable tarball of the mailops.deliverd collection, with the role in its roles/:
# dist/mailops-deliverd-<version>.tar.gz (ansible-galaxy collection install it), with the
# engine's wheel in its wheels/: the spec action imports the validator from it on a controller
# without deliverd, and the role installs hosts from it (there is no checkout to build from).
# What the controller needs besides ansible-core is declared, not installed: collection/
# requirements.txt, bindep.txt and meta/execution-environment.yml (for ansible-builder).
COLLECTION_BUILD := build/collection
.PHONY: collection
collection: venv
	rm -rf $(COLLECTION_BUILD)
	mkdir -p $(COLLECTION_BUILD)/roles dist
	cp -a collection/. $(COLLECTION_BUILD)/
	cp -a roles/deliverd $(COLLECTION_BUILD)/roles/deliverd
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir $(COLLECTION_BUILD)/wheels .
	$(BIN)/ansible-galaxy collection build --force --output-path dist $(COLLECTION_BUILD)

# Benchmarks (docs/performance.md): deliverd against Postfix on loopback, then the queue at
# scale. The bench extra brings matplotlib (plot) and py-spy (profiling); fast brings uvloop.
BENCH_ARGS ?=
QUEUE_SCALE_ARGS ?=
SENDMAIL_ARGS ?=
.PHONY: bench
bench: system-deps venv
	$(BIN)/pip install --quiet -e '.[bench,fast]'
	$(BIN)/python bench/relay $(BENCH_ARGS)
	$(BIN)/python bench/sendmail $(SENDMAIL_ARGS)
	$(BIN)/python bench/queue-scale $(QUEUE_SCALE_ARGS)
