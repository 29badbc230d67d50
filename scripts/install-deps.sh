#!/usr/bin/env bash
# Installs what pgha's demo and tests need on Debian 12, only when missing:
# PostgreSQL 15 (server, client tools, pgbench), etcd, HAProxy (for the
# load-balancer tests), curl (API tests), protoc and
# openssl (the TLS tests make throwaway certificates with it), iproute2 and
# nftables (network namespaces and fault rules of the chaos suite), systemd
# (systemd-analyze, for the packaging tests), and clang
# with libclang (the pg_query crate builds libpg_query and runs bindgen on it).
#
# --bench also installs the peers pgha-bench measures the proxy against:
# pgbouncer (pgha-bench proxy) and pgpool-II (pgha-bench route). The tests
# need neither.
set -euo pipefail
need=()
if [ "${1:-}" = "--bench" ]; then
  command -v pgbouncer >/dev/null || need+=(pgbouncer)
  command -v pgpool >/dev/null || need+=(pgpool2)
fi
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v haproxy >/dev/null || need+=(haproxy)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
command -v openssl >/dev/null || need+=(openssl)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v curl >/dev/null || need+=(curl)
# The network fault suite (pgha-bench chaos, tests/it/chaos.rs): ip and tc
# (iproute2) and nft (nftables).
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || ls /usr/lib/*/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
# The packaging tests (tests/it/packaging.rs): systemd-analyze checks the
# units without a running systemd; a fresh Debian 12 (a container image) has
# no systemd package. dpkg-deb and setpriv are always there (dpkg,
# util-linux).
command -v systemd-analyze >/dev/null || need+=(systemd)
# The S3 repository tests (src/backup/s3.rs, tests/it/backup.rs) run a
# local S3-compatible server, moto's moto_server, installed from PyPI below.
if ! command -v moto_server >/dev/null; then
  command -v pip3 >/dev/null || command -v pip >/dev/null || need+=(python3-pip)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The Debian packages start their own etcd/haproxy (and pgbouncer/pgpool2)
# services where systemd runs; pgha's tests and benches start private
# instances on free ports and need none.
if ! command -v moto_server >/dev/null; then
  pip="$(command -v pip3 || command -v pip)"
  "$pip" install --quiet 'moto[server]' 2>/dev/null ||
    "$pip" install --quiet --break-system-packages 'moto[server]'
fi
