#!/usr/bin/env bash
# Local Apache Kafka in KRaft mode on loopback, run on the machine's Java from the jars Maven
# Central serves (infra/kafka/pom.xml, cached in .local/kafka/libs).
#   KAFKA_BROKERS=1 (default): one node, broker + controller, on 127.0.0.1:59092.
#   KAFKA_BROKERS=3: three nodes, each broker + controller, on 127.0.0.1:59092, :59102, :59112.
# `up` fetches the jars if needed, formats each node's storage once, starts the nodes and waits
# until they accept connections; `down` stops the nodes this script started (by their PID files),
# whichever size is running; `start-node N` / `stop-node N` start or stop one node of the cluster.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
libs="$repo/.local/kafka/libs"
certs=${CERTS_DIR:-$repo/.local/certs}
pom="$repo/infra/kafka/pom.xml"
brokers=${KAFKA_BROKERS:-1}
case "$brokers" in
  1) home="$repo/.local/kafka/single" ;;
  3) home="$repo/.local/kafka/cluster" ;;
  *) echo "kafka.sh: KAFKA_BROKERS must be 1 or 3, not $brokers" >&2; exit 2 ;;
esac

broker_port() { echo $((59092 + 10 * ($1 - 1))); }
controller_port() { echo $((59093 + 10 * ($1 - 1))); }
node_dir() { echo "$home/node-$1"; }

fetch_jars() {
  local stamp="$libs/.pom.sha1" wanted
  wanted=$(sha1sum "$pom" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    return
  fi
  echo "kafka.sh: fetching Kafka jars with Maven" >&2
  rm -rf "$libs"
  mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs"
  echo "$wanted" >"$stamp"
}

java_command() { # node: sets the array java_cmd
  java_cmd=(
    java -Xms128m -Xmx512m -XX:+UseG1GC
    -Dlog4j2.configurationFile="$repo/infra/kafka/log4j2.properties"
    -Dkafka.logs.dir="$(node_dir "$1")/logs"
    -cp "$libs/*"
  )
}

write_config() { # node
  local node=$1 dir voters="" replicas=$brokers min_insync=1 n
  dir=$(node_dir "$node")
  mkdir -p "$dir/data" "$dir/logs"
  for n in $(seq 1 "$brokers"); do
    voters+="${voters:+,}$n@127.0.0.1:$(controller_port "$n")"
  done
  [ "$brokers" -ge 3 ] && min_insync=2
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$node
controller.quorum.voters=$voters
# Every listener is mutual TLS (make certs): clients, brokers and controllers all present a
# certificate of the local CA, whose CN becomes the principal the ACLs name.
listeners=SSL://127.0.0.1:$(broker_port "$node"),CONTROLLER://127.0.0.1:$(controller_port "$node")
advertised.listeners=SSL://127.0.0.1:$(broker_port "$node")
controller.listener.names=CONTROLLER
inter.broker.listener.name=SSL
listener.security.protocol.map=CONTROLLER:SSL,SSL:SSL
ssl.keystore.type=PEM
ssl.keystore.location=$certs/kafka.pem
ssl.truststore.type=PEM
ssl.truststore.location=$certs/ca.crt
ssl.client.auth=required
ssl.endpoint.identification.algorithm=https
ssl.principal.mapping.rules=RULE:^CN=([^,]+),.*$/\$1/,RULE:^CN=([^,]+)$/\$1/,DEFAULT
# Nothing is allowed that no ACL allows (servicekit.kafka.ACCESS), but to the brokers and the operator.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:kafka;User:admin
allow.everyone.if.no.acl.found=false
log.dirs=$dir/data
# Topics are created by the project (make infra-up), never by a client's first use.
auto.create.topics.enable=false
num.partitions=3
default.replication.factor=$replicas
min.insync.replicas=$min_insync
offsets.topic.replication.factor=$replicas
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$min_insync
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$min_insync
group.initial.rebalance.delay.ms=0
PROPS
}

# For Kafka's own command-line tools (`make events`): the operator's identity, over mutual TLS.
write_admin_client_config() {
  cat >"$repo/.local/kafka/admin-client.properties" <<PROPS
security.protocol=SSL
ssl.keystore.type=PEM
ssl.keystore.location=$certs/admin.pem
ssl.truststore.type=PEM
ssl.truststore.location=$certs/ca.crt
PROPS
}

pid_file() { echo "$(node_dir "$1")/kafka.pid"; }
is_running() { local f; f=$(pid_file "$1"); [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

format_once() { # node
  local dir cluster_id
  dir=$(node_dir "$1")
  java_command "$1"
  [ -f "$dir/data/meta.properties" ] && return
  if [ ! -s "$home/cluster.id" ]; then
    "${java_cmd[@]}" kafka.tools.StorageTool random-uuid >"$home/cluster.id"
  fi
  cluster_id=$(cat "$home/cluster.id")
  "${java_cmd[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$dir/server.properties" >/dev/null
}

start_node() { # node
  local node=$1 dir
  dir=$(node_dir "$node")
  if is_running "$node"; then
    return
  fi
  write_config "$node"
  format_once "$node"
  java_command "$node"
  nohup "${java_cmd[@]}" kafka.Kafka "$dir/server.properties" >"$dir/logs/stdout.log" 2>&1 &
  echo $! >"$(pid_file "$node")"
}

wait_for_node() { # node
  local node=$1 waited=0 port
  port=$(broker_port "$node")
  until port_open "$port"; do
    if ! is_running "$node"; then
      echo "kafka.sh: node $node exited; see $(node_dir "$node")/logs" >&2
      tail -n 20 "$(node_dir "$node")/logs/stdout.log" >&2
      exit 1
    fi
    if [ "$waited" -ge 240 ]; then
      echo "kafka.sh: node $node did not open 127.0.0.1:$port within 120 s" >&2
      exit 1
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
}

stop_node() { # node [signal]
  local node=$1 signal=${2:-TERM} pid waited=0 f
  f=$(pid_file "$node")
  if ! is_running "$node"; then
    rm -f "$f"
    return
  fi
  pid=$(cat "$f")
  kill "-$signal" "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge 120 ]; then
      echo "kafka.sh: node $node ($pid) ignored SIG$signal for 60 s; killing it" >&2
      kill -KILL "$pid"
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  rm -f "$f"
}

up() {
  if [ ! -s "$certs/kafka.pem" ]; then
    echo "kafka.sh: no broker certificate in $certs; run \`make certs\` first" >&2
    exit 1
  fi
  fetch_jars
  stop_other_size
  mkdir -p "$home"
  write_admin_client_config
  local node
  for node in $(seq 1 "$brokers"); do start_node "$node"; done
  for node in $(seq 1 "$brokers"); do wait_for_node "$node"; done
  echo "kafka.sh: $brokers node(s) up, bootstrap $(bootstrap)"
}

bootstrap() {
  local node list=""
  for node in $(seq 1 "$brokers"); do list+="${list:+,}127.0.0.1:$(broker_port "$node")"; done
  echo "$list"
}

stop_all_nodes() { # of $home: SIGTERM to every node at once, since a controller quorum that
  # lost its majority cannot finish a controlled shutdown; then wait for each. Prints the count.
  local node count=0
  for node in 1 2 3; do
    if is_running "$node"; then
      kill -TERM "$(cat "$(pid_file "$node")")"
      count=$((count + 1))
    fi
  done
  for node in 1 2 3; do stop_node "$node"; done
  echo "$count"
}

stop_other_size() {
  # Both sizes use 127.0.0.1:59092 for node 1: switching sizes stops the other (ours, by PID file).
  local this_home=$home other stopped
  other=$([ "$brokers" = 1 ] && echo cluster || echo single)
  home="$repo/.local/kafka/$other"
  stopped=$(stop_all_nodes)
  [ "$stopped" = 0 ] || echo "kafka.sh: stopped the $other setup ($stopped node(s)) first" >&2
  home=$this_home
}

down() {
  local size stopped=0
  for size in single cluster; do
    home="$repo/.local/kafka/$size"
    stopped=$((stopped + $(stop_all_nodes)))
  done
  echo "kafka.sh: stopped $stopped node(s)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  bootstrap) bootstrap ;;
  start-node) start_node "$2" && wait_for_node "$2" && echo "kafka.sh: node $2 up" ;;
  stop-node) stop_node "$2" "${3:-TERM}" && echo "kafka.sh: node $2 stopped" ;;
  *) echo "usage: $0 up|down|bootstrap|start-node N|stop-node N [SIGNAL]" >&2; exit 2 ;;
esac
