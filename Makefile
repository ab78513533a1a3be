# The local workflow: `make run` to start everything, `make test` to run the whole suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := .local/bin
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
# Where googleapis-common-protos keeps google/type/money.proto and friends.
GOOGLEAPIS  = $(shell $(PY) -c 'import google.type, os; print(os.path.dirname(os.path.dirname(list(google.type.__path__)[0])))')

# The owner role's URL, for the migrations; each service logs in as its own role (README).
MIGRATION_DATABASE_URL ?= postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce
export TEST_DATABASE_URL ?= postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_test
# KAFKA_BROKERS=3: a three-node KRaft cluster, topics with replication factor 3, min.insync 2.
CLUSTER_BOOTSTRAP := 127.0.0.1:59092,127.0.0.1:59102,127.0.0.1:59112
export KAFKA_BROKERS ?= 1
ifeq ($(KAFKA_BROKERS),3)
export KAFKA_BOOTSTRAP_SERVERS ?= $(CLUSTER_BOOTSTRAP)
export KAFKA_REPLICATION_FACTOR ?= 3
endif
export KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:59092

.PHONY: help venv lock tools protos check-protos proto-deps breaking lint format certs token infra-up \
        infra-down migrate run test dlq-replay events fuzz chaos chaos-cluster bench bench-e2e \
        k8s-validate k8s-secrets

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Create the virtualenv from the pinned lock files

# Every file checked against the lock's hashes; the project itself (no hash) on its own, no deps.
$(VENV)/.installed: requirements.lock requirements-dev.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# To move a version: edit its `==` in requirements*.lock, then `make lock`.
lock: ## Write the sha256 of every PyPI file of each pinned version into requirements*.lock
	python3 scripts/lock.py

tools: ## Install pinned grpcurl, buf, kustomize, kubeconform (.local/bin) and Kubernetes schemas
	bash scripts/tools.sh

k8s-validate: tools ## kustomize build deploy/k8s's base and overlays | kubeconform -strict, offline
	bash scripts/k8s.sh validate

k8s-secrets: certs ## Copy make certs' output into deploy/k8s/overlays/*/secrets (git ignores it)
	bash scripts/k8s.sh secrets

# The generated packages: ours, and gRPC reflection v1 (protos/grpc_reflection_v1/reflection.proto).
GEN_PACKAGES := gen/ecommerce gen/grpc_reflection_v1

protos: venv ## Regenerate gen/ from protos/
	rm -rf $(GEN_PACKAGES)
	mkdir -p gen
	PATH="$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos -I $(GOOGLEAPIS) \
	  --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTO_FILES)
	for package in $(GEN_PACKAGES); do \
	  find $$package -type d -exec touch {}/__init__.py \; && touch $$package/py.typed; \
	done

check-protos: protos ## Fail when gen/ is not what `make protos` produces
	@test -z "$$(git status --porcelain -- gen)" || \
	  { git status --short -- gen; echo "gen/ is stale: run 'make protos' and commit it"; exit 1; }

# The googleapis protos ours import, from googleapis-common-protos, where buf.yaml finds them.
GOOGLE_PROTOS := google/api/field_behavior.proto google/rpc/status.proto google/type/money.proto

proto-deps: venv ## Copy the googleapis imports to .local/proto-deps for buf
	rm -rf .local/proto-deps
	for proto in $(GOOGLE_PROTOS); do \
	  mkdir -p .local/proto-deps/$$(dirname $$proto) && cp $(GOOGLEAPIS)/$$proto .local/proto-deps/$$proto; \
	done

# BREAKING_AGAINST=<commit> sets the baseline; scripts/breaking.sh says how it is chosen otherwise.
breaking: tools proto-deps ## Fail when protos/ breaks the contract of main (buf breaking)
	bash scripts/breaking.sh

lint: venv tools proto-deps ## ruff, mypy and buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy servicekit dbschema user_service order_service processor ecommerce_client migrations testsupport chaos tests bench
	$(BIN)/buf lint

format: venv ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

certs: ## A local CA, a certificate per identity and the token signing key, in .local/certs
	bash scripts/certs.sh

SUB ?= admin
SCOPE ?= admin
token: venv certs ## Print a bearer token: make token SUB=<user id> SCOPE=user (or SCOPE=admin)
	@$(PY) -m servicekit.tokens --sub "$(SUB)" --scope "$(SCOPE)"

infra-up: venv certs ## Start PostgreSQL (127.0.0.1:55432) and Kafka (127.0.0.1:59092, mTLS), topics, ACLs
	bash scripts/postgres.sh up
	bash scripts/kafka.sh up
	$(PY) -m servicekit.topics

infra-down: ## Stop what infra-up started
	bash scripts/kafka.sh down
	bash scripts/postgres.sh down

migrate: venv infra-up ## Apply the Alembic migrations, as the owner role
	DATABASE_URL=$(MIGRATION_DATABASE_URL) $(VENV)/bin/alembic upgrade head

run: venv tools migrate ## Start the services and the processor in the foreground; Ctrl-C stops them
	bash scripts/run_local.sh

dlq-replay: venv ## Republish dead-lettered order events to their topic
	$(PY) -m processor.dlq_replay

TOPIC ?= ecommerce.orders.v1
events: ## Print keys and CloudEvents headers of TOPIC's events (Ctrl-C stops)
	java -Dlog4j2.configurationFile=infra/kafka/log4j2.properties -Dkafka.logs.dir=.local/kafka/logs \
	  -cp '.local/kafka/libs/*' org.apache.kafka.tools.consumer.ConsoleConsumer \
	  --bootstrap-server $(KAFKA_BOOTSTRAP_SERVERS) --topic $(TOPIC) --from-beginning \
	  --consumer.config .local/kafka/admin-client.properties \
	  --property print.key=true --property print.headers=true --property print.value=false

fuzz: venv tools infra-up ## The hostile-input property tests at full size (2,100 cases)
	HYPOTHESIS_PROFILE=full $(PY) -m pytest tests/test_hostile_input.py

chaos: venv infra-up ## The full fault suite (5,000 orders per fault); writes chaos/RESULTS.md
	$(PY) -m chaos --profile full --results chaos/RESULTS.md

chaos-cluster: venv ## kill -9 of one broker of a three-node cluster under load; chaos/RESULTS-cluster.md
	$(MAKE) infra-up KAFKA_BROKERS=3
	KAFKA_BOOTSTRAP_SERVERS=$(CLUSTER_BOOTSTRAP) KAFKA_REPLICATION_FACTOR=3 \
	  $(PY) -m chaos --profile cluster --results chaos/RESULTS-cluster.md

# BENCH_ARGS=--quick: a development run of a few minutes (prints, writes no RESULTS.md).
bench: venv infra-up ## Cost per order, max sustainable rate, overload, soak (~20 min); bench/RESULTS.md
	bash scripts/tools.sh --with-ghz
	$(PY) -m bench.run $(BENCH_ARGS)

bench-e2e: venv ## CreateOrder -> PROCESSED latency through the running stack (make run first)
	$(PY) -m bench.e2e_latency

test: venv tools infra-up ## The whole suite, against the real Postgres and real servers
	$(PY) -m pytest
