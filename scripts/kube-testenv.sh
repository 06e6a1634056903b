#!/usr/bin/env bash
# Get the real Kubernetes API server the tests run against: build it once, install etcd.
#
# No package registry ships kube-apiserver, but Debian's source package `kubernetes`
# (1.20.2 with its vendor/ tree) builds it offline with Debian's Go. The binaries are cached
# outside the clone (AVIATOR_KUBE_CACHE, default ~/.cache/aviator/kubernetes-1.20.2), so only the
# first run on a machine pays the build (5.5 min measured on this project's 2-core machine, up
# to ~17 min on a busy one). Elsewhere than Debian, point KUBE_APISERVER,
# KUBE_CONTROLLER_MANAGER, ETCD and ETCDCTL (and KUBECTL) at existing binaries and this script
# only checks them. Idempotent: with everything in place it returns at once, touching nothing.
#
# Prints nothing but progress on stderr; exits non-zero if the test environment cannot be had.
set -euo pipefail

VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=${AVIATOR_KUBE_CACHE:-$HOME/.cache/aviator/kubernetes-$VERSION}
log() { echo "kube-testenv: $*" >&2; }

runtime_ok() {
  command -v "${ETCD:-etcd}" >/dev/null && command -v "${ETCDCTL:-etcdctl}" >/dev/null &&
    command -v openssl >/dev/null && command -v setpriv >/dev/null &&
    command -v "${KUBECTL:-kubectl}" >/dev/null
}
servers_ok() {
  [ -x "${KUBE_APISERVER:-$CACHE/kube-apiserver}" ] &&
    [ -x "${KUBE_CONTROLLER_MANAGER:-$CACHE/kube-controller-manager}" ]
}

if runtime_ok && servers_ok; then
  exit 0
fi
if [ -n "${KUBE_APISERVER:-}${KUBE_CONTROLLER_MANAGER:-}${ETCD:-}${ETCDCTL:-}${KUBECTL:-}" ]; then
  log "KUBE_APISERVER/KUBE_CONTROLLER_MANAGER/ETCD/ETCDCTL/KUBECTL are set, but not all of" \
    "them (nor openssl and setpriv) are executable"
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  log "not Debian: set KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, ETCD and ETCDCTL to existing binaries"
  exit 1
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive

apt_install() {
  # A package's service must not start at install (etcd-server has one): tests start their own.
  echo 'exit 101' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  local rc=0
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null || rc=$?
  if [ "$rc" != 0 ]; then # a machine whose package lists were never fetched
    rc=0
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } || rc=$?
  fi
  $SUDO rm -f /usr/sbin/policy-rc.d
  return "$rc"
}

if ! runtime_ok; then
  log "installing etcd-server etcd-client openssl util-linux"
  apt_install etcd-server etcd-client openssl util-linux
  if ! command -v "${KUBECTL:-kubectl}" >/dev/null; then
    # The machine image's kubectl (1.32) is the `kubectl` package of its own apt source;
    # Debian's kubernetes-client (1.20) is the fallback (enough for the tests, not for
    # scripts/release.sh, whose kustomize needs kubectl >= 1.21).
    log "installing kubectl"
    apt_install kubectl 2>/dev/null || apt_install kubernetes-client
  fi
fi
if servers_ok; then
  exit 0
fi

# Building: the source package needs deb-src entries, copied from the machine's Debian entry.
SRC=/etc/apt/sources.list.d/aviator-deb-src.sources
if [ ! -f "$SRC" ]; then
  log "adding deb-src entries ($SRC)"
  $SUDO tee "$SRC" >/dev/null <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  $SUDO apt-get update -qq
fi
if ! command -v go >/dev/null || ! command -v rsync >/dev/null || ! command -v make >/dev/null ||
  ! command -v dpkg-deb >/dev/null; then
  log "installing the build tools: golang-go rsync make dpkg-dev"
  apt_install golang-go rsync make dpkg-dev
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/aviator-kube-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
log "fetching Debian source kubernetes=$DEB_VERSION into $WORK"
apt-get source --download-only -qq "kubernetes=$DEB_VERSION" >/dev/null 2>&1 ||
  { log "apt-get source kubernetes=$DEB_VERSION failed"; exit 1; }
tar -xzf kubernetes_*.orig.tar.gz
TREE=$(find . -maxdepth 1 -mindepth 1 -type d -name 'kubernetes*' | head -1)
[ -d "$TREE/cmd/kube-apiserver" ] || { log "unexpected source layout in $WORK"; ls >&2; exit 1; }

# Go >= 1.18 with the vendored reflect2 1.0.1 crashes on the first custom object; take Debian's
# newer reflect2 (1.0.2) and json-iterator (1.1.12).
log "replacing vendored reflect2 and json-iterator with Debian's copies"
apt-get download -qq golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev 2>/dev/null
for deb in golang-github-modern-go-reflect2-dev_*.deb golang-github-json-iterator-go-dev_*.deb; do
  dpkg-deb -x "$deb" debs
done
for lib in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  dst="$TREE/vendor/$lib"
  rm -rf "$dst"; mkdir -p "$dst"
  src="debs/usr/share/gocode/src/$lib"
  find "$src" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name LICENSE \) ! -name '*_test.go' \
    -exec cp {} "$dst/" \;
done

log "building kube-apiserver and kube-controller-manager (5-17 minutes on 2 cores)"
start=$(date +%s)
mkdir -p home
(cd "$TREE" && HOME="$WORK/home" GOPROXY=off CGO_ENABLED=0 KUBE_GIT_VERSION=v$VERSION \
  KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$WORK/build.log" 2>&1) || {
  tail -50 "$WORK/build.log" >&2; exit 1; }

mkdir -p "$CACHE"
for b in kube-apiserver kube-controller-manager; do
  install -m 0755 "$TREE/_output/bin/$b" "$CACHE/$b.tmp" && mv "$CACHE/$b.tmp" "$CACHE/$b"
done
log "built in $(($(date +%s) - start)) s, cached in $CACHE"
