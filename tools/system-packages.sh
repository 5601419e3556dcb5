#!/usr/bin/env bash
# Installs the Debian packages the tests run (apt, only what is missing; needs root):
#   openssl          the test control plane's keys and certificates
#   runc             the real node's OCI runtime (testbed/realnode.py)
#   busybox-static   the real node's test image (testbed/images.py)
#   chromium         the report's browser tests (tests/support/browser.py), with fonts-dejavu-core
#   openjdk-17-jre-headless, maven   the Kafka broker of the Kafka output's tests (testbed/kafka.py):
#                    Java 17 runs it, Maven fetches its jars from Maven Central (tools/kafka)
#   tools/system-packages.sh          install what is missing
#   tools/system-packages.sh --check  only say what is missing (exit 1 if anything is)
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
[ -x /usr/sbin/runc ] || need+=(runc)
command -v chromium >/dev/null || need+=(chromium fonts-dejavu-core)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
# a static busybox: ldd refuses it ("not a dynamic executable")
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "${1:-}" = "--check" ]; then echo "missing Debian packages: ${need[*]} (tools/system-packages.sh installs them)"; exit 1; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing Debian packages: ${need[*]}; install them (apt-get install ${need[*]}) or run this as root" >&2
  exit 1
fi
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
