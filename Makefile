# Provisioning, Docker engine start-up and the test/dev entry points for Fleet.
#
#   make install   apt packages (only the missing ones), .venv, editable install, and the
#                  wheelhouse (var/wheelhouse: wheels of the agent's dependencies and of the
#                  build backend, for installing the agent without the package index)
#   make engine    start dockerd (loopback-only published ports) unless one answers
#   make test      install + engine, then lint-imports (the import floors of .importlinter)
#                  and pytest $(PYTEST_ARGS); the tests start their own
#                  throwaway PostgreSQL cluster (Debian's postgresql, on a free loopback port)
#                  unless FLEET_TEST_POSTGRES_URL names a server to use
#   make run       install + engine, then `fleet-server devstack`
#
# Everything created at run time lives under var/ (gitignored).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

APT_PACKAGES := docker.io mosquitto mosquitto-clients docker-registry \
                busybox-static mmdebstrap apache2-utils postgresql \
                docker-compose
VENV         := .venv
PYTHON       := $(VENV)/bin/python
STAMP        := $(VENV)/.installed
VAR          := var
WHEELHOUSE   := $(VAR)/wheelhouse
WHEELS_STAMP := $(WHEELHOUSE)/.built
ENGINE_LOG   := $(VAR)/dockerd.log
ENGINE_WAIT  ?= 60
PYTEST_ARGS  ?=

# The reaper image cannot be pulled here, and testcontainers must reach
# published ports through loopback rather than the bridge gateway.
TEST_ENV := TESTCONTAINERS_RYUK_DISABLED=true \
            TESTCONTAINERS_CONNECTION_MODE=docker_host \
            TC_HOST=127.0.0.1

.PHONY: install packages engine test run

install: packages $(STAMP) $(WHEELS_STAMP)

# `dpkg -s` also succeeds for removed packages whose config files remain, so
# the status itself is compared; it is read whole first because under
# pipefail `dpkg -s | grep -q` fails whenever grep stops reading early.
packages:
	@missing=""
	for pkg in $(APT_PACKAGES); do
	    status=$$(dpkg -s "$$pkg" 2>/dev/null || true)
	    if ! grep -q '^Status: install ok installed' <<<"$$status"; then
	        missing="$$missing $$pkg"
	    fi
	done
	if [ -n "$$missing" ]; then
	    echo "installing apt packages:$$missing"
	    export DEBIAN_FRONTEND=noninteractive
	    apt-get update
	    apt-get install -y $$missing
	fi

$(STAMP): setup.cfg setup.py
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

# Rebuilt from nothing when setup.cfg changes, so no wheel of a dropped dependency
# lingers; the project's own wheel is removed, since tests build it from the tree.
$(WHEELS_STAMP): setup.cfg setup.py | $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(PYTHON) -m pip wheel --quiet --wheel-dir $(WHEELHOUSE) '.[device]' setuptools wheel
	rm -f $(WHEELHOUSE)/fleet_containers-*.whl
	touch $@

# An engine started elsewhere (e.g. by the apt package's init script) is used
# as is; the warning flags one whose published ports are not loopback-only.
engine: packages
	@if timeout 20 docker info >/dev/null 2>&1; then
	    bind=$$(timeout 20 docker network inspect bridge \
	        -f '{{index .Options "com.docker.network.bridge.host_binding_ipv4"}}' 2>/dev/null || true)
	    if [ "$$bind" != "127.0.0.1" ]; then
	        echo "warning: the running Docker engine publishes ports on '$${bind:-0.0.0.0}'," \
	             "not 127.0.0.1 (it was not started by 'make engine')" >&2
	    fi
	    exit 0
	fi
	mkdir -p $(VAR)
	echo "starting dockerd (log: $(ENGINE_LOG))"
	setsid nohup dockerd --ip 127.0.0.1 >>$(ENGINE_LOG) 2>&1 </dev/null &
	deadline=$$((SECONDS + $(ENGINE_WAIT)))
	until timeout 10 docker info >/dev/null 2>&1; do
	    if (( SECONDS >= deadline )); then
	        echo "error: dockerd did not answer 'docker info' within $(ENGINE_WAIT)s;" \
	             "last lines of $(ENGINE_LOG):" >&2
	        tail -n 30 $(ENGINE_LOG) >&2 || true
	        exit 1
	    fi
	    sleep 1
	done
	echo "dockerd is up"

test: install engine
	$(VENV)/bin/lint-imports
	$(TEST_ENV) $(PYTHON) -m pytest $(PYTEST_ARGS)

run: install engine
	exec $(VENV)/bin/fleet-server devstack

# Each recipe runs in one shell, so multi-line blocks read as plain bash.
.ONESHELL:
