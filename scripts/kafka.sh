#!/usr/bin/env bash
# Local Apache Kafka (KRaft, combined broker + controller, one node) on loopback, run on the machine's
# Java from the jars Maven Central serves (infra/kafka/pom.xml, cached in .local/kafka/libs).
# `up` fetches the jars if needed, formats the storage once, starts the broker and waits until it
# accepts connections; `down` stops the broker this script started (by its PID file). Idempotent.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
home="$repo/.local/kafka"
libs="$home/libs"
data="$home/data"
logs="$home/logs"
pid_file="$home/kafka.pid"
port=${KAFKA_PORT:-59092}
controller_port=${KAFKA_CONTROLLER_PORT:-59093}
pom="$repo/infra/kafka/pom.xml"

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

java_options=(
  -Xms128m -Xmx512m -XX:+UseG1GC
  -Dlog4j2.configurationFile="$repo/infra/kafka/log4j2.properties"
  -Dkafka.logs.dir="$logs"
  -cp "$libs/*"
)

kafka_java() { java "${java_options[@]}" "$@"; } # main-class args...

write_config() {
  mkdir -p "$data" "$logs"
  cat >"$home/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data
# Topics are created by the project (make infra-up), never by a client's first use.
auto.create.topics.enable=false
num.partitions=3
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
}

is_running() { [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

up() {
  if is_running; then
    echo "kafka.sh: already running on 127.0.0.1:$port (pid $(cat "$pid_file"))"
    return
  fi
  fetch_jars
  write_config
  if [ ! -f "$data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid)
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$home/server.properties" >/dev/null
  fi
  nohup java "${java_options[@]}" kafka.Kafka "$home/server.properties" >"$logs/stdout.log" 2>&1 &
  echo $! >"$pid_file"
  local waited=0
  until port_open; do
    if ! is_running; then
      echo "kafka.sh: the broker exited; see $logs/stdout.log and $logs/server.log" >&2
      tail -n 20 "$logs/stdout.log" >&2
      rm -f "$pid_file"
      exit 1
    fi
    if [ "$waited" -ge 120 ]; then
      echo "kafka.sh: the broker did not open 127.0.0.1:$port within 60 s" >&2
      exit 1
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "kafka.sh: started on 127.0.0.1:$port (pid $(cat "$pid_file"))"
}

down() {
  if ! is_running; then
    echo "kafka.sh: not running"
    rm -f "$pid_file"
    return
  fi
  local pid waited=0
  pid=$(cat "$pid_file")
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge 60 ]; then
      echo "kafka.sh: broker $pid ignored SIGTERM for 30 s; killing it" >&2
      kill -KILL "$pid"
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  rm -f "$pid_file"
  echo "kafka.sh: stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
