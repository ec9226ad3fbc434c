# Two entry points for a fresh Debian 12 machine (run as root, or with sudo for the apt step):
#   make demo   installs what is missing, builds a demo image from local files, converts it through
#               the cache and runs it (offline)
#   make test   installs what is missing and runs the whole test suite (starts its own services)

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PYTEST_ARGS ?=

# Debian packages the runtime, the demo and the tests need (the python3-* ones let an unprivileged
# test user, who cannot read root's Python, run hpcsif from this checkout with Debian's Python)
APT_PACKAGES = squashfs-tools squashfs-tools-ng squashfuse fuse3 bubblewrap busybox-static \
	skopeo umoci zstd pigz docker-registry apache2-utils podman \
	slurm-wlm slurm-client munge libslurm-dev gcc make \
	openssh-server openssh-client debootstrap util-linux procps psmisc iproute2 \
	python3-requests python3-fsspec python3-paramiko python3-cryptography python3-zstandard gnupg \
	fuse-overlayfs fuse2fs e2fsprogs libpmix2 libpmix-dev python3-venv python3-pip

.PHONY: deps apt-deps py-deps native demo test lint bench

apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

py-deps:
	$(PIP) install -q -e '.[test]'

# The native front (hpcsif/native/front.c) takes the place of the `hpcsif` console script pip
# wrote: it repeats a container start the Python CLI saved (same command line, environment,
# directory, unchanged files) without starting Python, and runs the Python CLI for all else.
SCRIPTS_DIR = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PYTHON_EXE = $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
native: py-deps
	mkdir -p build
	$(CC) -O2 -Wall -Wextra -o build/hpcsif-front -DHPCSIF_PYTHON='"$(PYTHON_EXE)"' hpcsif/native/front.c
	@if [ -f "$(SCRIPTS_DIR)/hpcsif" ]; then install -m 0755 build/hpcsif-front "$(SCRIPTS_DIR)/hpcsif"; \
		echo "installed the native front as $(SCRIPTS_DIR)/hpcsif"; \
	else echo "no hpcsif script in $(SCRIPTS_DIR): the native front is left in build/hpcsif-front"; fi

deps: apt-deps py-deps native

demo: deps
	$(PYTHON) -m hpcsif.demo

test: deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint:
	ruff check hpcsif tests benchmarks
	ruff format --check hpcsif tests benchmarks
