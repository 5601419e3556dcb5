#!/usr/bin/env bash
# Apache Kafka (the KRaft broker of the Kafka output's tests and `python -m testbed.kafka up`):
# the runtime jars of tools/kafka/pom.xml from Maven Central, checked against the lock
# tools/kafka/jars.sha256, into $cache/kafka-<key>/lib (Maven's own repository is cached there too)
# and linked as $bin/kafka-lib. tools/build.sh runs it; it needs no Go, so it also runs alone.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBEMETER_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubemeter-tools}
bin=${KUBEMETER_TOOLS_BIN:-$cache/bin}
mkdir -p "$cache" "$bin"
started=$SECONDS
key=$(cat "$here/kafka/pom.xml" "$here/kafka/jars.sha256" | sha256sum | cut -c1-16)
out="$cache/kafka-$key"
(
  flock 9  # several clones may fetch at once: one writes, the others wait and reuse it
  if [ ! -f "$out/lib/.verified" ]; then
    command -v java >/dev/null || { echo "Java 17 is required for the Kafka broker (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
    command -v mvn >/dev/null || { echo "Maven is required to fetch the Kafka broker (apt-get install maven)" >&2; exit 1; }
    echo "fetching Kafka jars (tools/kafka/pom.xml) into $out" >&2
    rm -rf "$out.tmp"
    mvn -q -B -Dstyle.color=never -f "$here/kafka/pom.xml" -Dmaven.repo.local="$cache/maven-repository" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$out.tmp/lib" >&2
    # The lock: exactly these jars with exactly these digests, or nothing is installed.
    (cd "$out.tmp/lib" && ls -1 | sort | cmp -s - <(awk '{print $2}' "$here/kafka/jars.sha256" | sort) \
      && sha256sum --quiet -c "$here/kafka/jars.sha256") \
      || { echo "Kafka jars differ from tools/kafka/jars.sha256" >&2; exit 1; }
    touch "$out.tmp/lib/.verified"
    rm -rf "$out" && mv "$out.tmp" "$out"
    echo "fetched Kafka in $((SECONDS - started)) s" >&2
  fi
) 9>"$cache/kafka.lock"
ln -sfn "$out/lib" "$bin/kafka-lib"
