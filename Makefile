# Tidepool's entry points. Two of them set up a fresh machine:
#   make demo   install what is missing, build, run the stack and the seed's experiments
#   make test   install what is missing and run every test
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Heavy build output lives outside the checkout, so a fresh clone on a warm
# machine reuses it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/tidepool/cargo-target

.PHONY: help deps build up down status demo test soak lint bench bench-web bench-operator bench-node bench-e2e bench-dashboards bench-autoscaling bench-router bench-shop bench-django bench-tls bench-rotation bench-cloudnative-pg bench-periodic bench-workflows clean kube-build kube-up kube-down images

help:
	@echo "make demo    install, build, start the local stack, run the seed's experiments"
	@echo "make test    install, then run every test (lint, unit, integration)"
	@echo "make up      start PostgreSQL, PgBouncer and tidepool web on loopback"
	@echo "make down    stop them"
	@echo "make soak    run the whole test suite ROUNDS (5) times with every core busy"
	@echo "make bench   run the benchmarks and write docs/benchmarks.md"
	@echo "make bench-web       run only the web ones (sections 1 to 5)"
	@echo "make bench-operator  run only the operator's (section 9)"
	@echo "make bench-node      run only the real node's (section 10)"
	@echo "make bench-e2e       run only the end-to-end ones on the real node (section 11)"
	@echo "make bench-dashboards redraw the dashboard from a real Prometheus (section 12)"
	@echo "make bench-autoscaling run only the scaling ones (section 13)"
	@echo "make bench-router    the router layer beside the previous hand-written one and pgbench (section 14)"
	@echo "make bench-tls       /row/ through PgBouncer with verify-full beside plaintext (section 18)"
	@echo "make bench-rotation  a password rotation under load on the real node: failed requests, the time to the first new login (section 19)"
	@echo "make bench-cloudnative-pg the seed's experiments on CloudNativePG's PostgreSQL 17 beside the host's 15, an instance restart, rotation and budget (section 20)"
	@echo "make bench-periodic  periodic tasks: occurrence to job start, what schedule checks cost PostgreSQL, jobs/s beside schedules (section 21)"
	@echo "make bench-workflows the worker against the bare loop, rate-limit precision, a 10,000-member chord, enqueue to start (section 22)"
	@echo "make bench-shop      the shop's POST /orders with and without its receipt job, orders to receipts (section 16)"
	@echo "make bench-django    the Django + Celery example on the real node, beside its image on loopback and the Tidepool app (section 17)"
	@echo "make images  build the container images from images/*/Dockerfile and examples/shop (no registry) and load them into the real node"
	@echo "make kube-up start a real Kubernetes cluster: control plane, kwok's fake node and a real node (containerd, kubelet, kube-proxy) in a network namespace"
	@echo "make kube-down stop it and put back what the node changed on the host"

deps:
	@scripts/install-deps.sh

build: deps
	cargo build --release --workspace --bins

up: build
	@scripts/stack.sh up

down:
	@scripts/stack.sh down

status:
	@scripts/stack.sh status

demo: build
	@scripts/demo.sh

test: deps
	@scripts/test.sh

# The flake hunt: the whole suite ROUNDS times with every core busy.
ROUNDS ?= 5
soak: deps
	@scripts/soak-tests.sh $(ROUNDS)

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc -p tidepool --no-deps

bench: build
	@scripts/install-deps.sh bench
	@scripts/bench.sh

bench-web: build
	@scripts/install-deps.sh bench
	@BENCH_WEB_ONLY=1 scripts/bench.sh

bench-operator: deps
	@scripts/bench-operator.sh

bench-node: build
	@scripts/bench-node.sh

bench-e2e: build
	@scripts/bench-e2e.sh

bench-dashboards: build
	@scripts/install-deps.sh bench
	@scripts/bench-dashboards.sh

bench-autoscaling: build
	@scripts/bench-autoscaling.sh

bench-router: build
	@scripts/install-deps.sh bench
	@scripts/bench-router.sh

bench-tls: build
	@scripts/install-deps.sh bench
	@scripts/bench-tls.sh

bench-rotation: build
	@scripts/bench-rotation.sh

bench-cloudnative-pg: build
	@scripts/bench-cloudnative-pg.sh

bench-periodic: build
	@scripts/bench-periodic.sh

bench-workflows: build
	@scripts/bench-workflows.sh

bench-shop: build
	@scripts/install-deps.sh bench
	@scripts/bench-shop.sh

bench-django: build
	@scripts/bench-django.sh

kube-build: deps
	@scripts/kube-build.sh

images: build
	@scripts/images.sh

kube-up: images
	@scripts/kube.sh up

kube-down:
	@scripts/kube.sh down

clean: kube-down
	@scripts/stack.sh clean
