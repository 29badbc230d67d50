#!/usr/bin/env bash
# Builds the pgha Debian package with dpkg-deb (docs/deploy.md).
#
#   scripts/build-deb.sh [--binary PATH] [--out DIR] [--compress xz|gzip|none]
#
# Without --binary it builds the release binary first (cargo build --release
# --locked). --out defaults to target/debian. The package: /usr/bin/pgha, the
# systemd units (packaging/deb), the documentation and the example
# configurations under /usr/share/doc/pgha, and the empty directories
# /etc/pgha (0750) and /var/lib/pgha (0755), all root-owned. It installs no
# /etc/pgha/pgha.toml, so nothing starts by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
out="target/debian"
compress="xz"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --compress) compress="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  cargo build --release --locked --bin pgha
  binary="target/release/pgha"
fi
[ -x "$binary" ] || { echo "build-deb.sh: $binary is not an executable" >&2; exit 2; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
arch="$(dpkg --print-architecture)"
maintainer="${DEB_MAINTAINER:-pgha maintainers <pgha@localhost>}"
mkdir -p "$out"
stage="$(mktemp -d "${TMPDIR:-/tmp}/pgha-deb.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"

install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
  "$root/usr/share/doc/pgha/examples" "$root/var/lib/pgha"
install -d -m 0750 "$root/etc/pgha"
install -m 0755 "$binary" "$root/usr/bin/pgha"
# A release binary carries no debug information worth its size; a debug
# one (the tests package it to save a release build) keeps its symbols.
if [ "$(basename "$(dirname "$binary")")" = release ]; then
  strip --strip-unneeded "$root/usr/bin/pgha"
fi
install -m 0644 packaging/deb/pgha.service packaging/deb/pgha-proxy.service "$root/lib/systemd/system/"
install -m 0644 packaging/deb/examples/pgha.toml packaging/deb/examples/proxy.toml "$root/usr/share/doc/pgha/examples/"
install -m 0644 packaging/deb/copyright README.md docs/*.md "$root/usr/share/doc/pgha/"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"

# Shared-library dependencies: dpkg-shlibdeps where dpkg-dev is installed,
# else the newest glibc symbol version the binary uses.
shlibs=""
if command -v dpkg-shlibdeps >/dev/null; then
  mkdir -p "$stage/src/debian"
  printf 'Source: pgha\n\nPackage: pgha\nArchitecture: any\n' > "$stage/src/debian/control"
  shlibs="$(cd "$stage/src" && dpkg-shlibdeps -O "$root/usr/bin/pgha" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
fi
if [ -z "$shlibs" ]; then
  glibc="$(objdump -T "$root/usr/bin/pgha" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
  shlibs="libc6 (>= ${glibc:-2.34}), libgcc-s1 (>= 4.2)"
fi

size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  -e "s/@SHLIBS@/$shlibs/" -e "s/@MAINTAINER@/$maintainer/" \
  packaging/deb/control.in > "$root/DEBIAN/control"

deb="$out/pgha_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$root" "$deb" >/dev/null
echo "$deb"
