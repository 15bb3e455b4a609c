#!/usr/bin/env bash
# Builds the pinned control-plane binaries from their Go modules (Go module proxy only)
# into ~/.cache/kubeonnx/bin/<component>-<version>/, skipping what is already there.
# Prints the directory of each component on stdout, one "NAME=DIR" line each.
# With no argument: the default set (what the local control plane and `make demo` need);
# components named on the command line otherwise (e.g. `prometheus`, for the e2e suite only).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KUBEONNX_CACHE:-$HOME/.cache/kubeonnx}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
log() { printf '[build-binaries] %s\n' "$*" >&2; }

# Each component lands in its own version-keyed directory, moved into place only
# when every binary of it has been built, so an interrupted build is never reused.
have() { local dir=$1; shift; for b in "$@"; do [ -e "$dir/$b" ] || return 1; done; }

# Work folders of the builds under way: removed on any exit, Ctrl-C and `kill` included.
works=()
new_work() { work=$(mktemp -d -t kubeonnx-build.XXXXXX); works+=("$work"); }  # sets the caller's $work
cleanup() { [ ${#works[@]} -eq 0 ] || rm -rf "${works[@]}"; }
trap cleanup EXIT
trap 'log "interrupted: nothing half-built is kept (the next run builds it again)"; exit 130' INT
trap 'log "stopped: nothing half-built is kept (the next run builds it again)"; exit 143' TERM

# The field $1 of the JSON `go mod download -json` prints (or its error, in one line); quiet
# on Ctrl-C, which the build's trap reports. Python starts with Ctrl-C ignored: one
# interrupted while it imports its own modules printed a traceback ("Fatal Python error");
# once started, Ctrl-C ends it without a word.
json_field() {
  (trap '' INT; exec python3 -c 'import json, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
raw = sys.stdin.read()
if not raw.strip():
    sys.exit(1)  # go printed nothing: it said why itself, or was interrupted (the trap says so)
d = json.loads(raw)
print(d.get(sys.argv[1]) or sys.exit("[build-binaries] go mod download: " + d.get("Error", "no " + sys.argv[1])))' "$1")
}
# Whether version $1 (1.26.7) is at least $2.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
# Why the Go on PATH cannot build the pinned modules (nothing when it can).
go_problem() {
  if ! command -v go >/dev/null; then
    echo "Go is not installed: install Go $GO_VERSION or newer (https://go.dev/dl/) and put it on PATH; it builds the pinned binaries once into $cache/bin"
    return
  fi
  local have_v; have_v=$(go env GOVERSION 2>/dev/null); have_v=${have_v#go}
  if ! version_ge "${have_v:-0}" "$GO_VERSION"; then
    echo "Go $GO_VERSION or newer is needed (the pinned modules' go.mod say so), not Go ${have_v:-of unknown version} ($(command -v go)): install it from https://go.dev/dl/ and put it first on PATH, or let this Go fetch it through the Go module proxy (as .ci/run does): export PATH=\"\$(bash e2e/build-binaries.sh --fetch-go)/bin:\$PATH\""
  fi
}
# Called before the first build: without a new enough Go, one line saying what to install.
need_go() {
  local problem; problem=$(go_problem)
  [ -z "$problem" ] && return
  log "$problem"
  exit 3
}
# A Go toolchain of GO_VERSION, through the Go module proxy (the module golang.org/toolchain,
# what `go` itself downloads to switch toolchains), with whatever Go is on PATH (1.13 or
# newer); cached under $cache/go. Prints its GOROOT (its bin/go is the toolchain).
fetch_go() {
  local arch; case $(uname -m) in x86_64) arch=amd64 ;; aarch64 | arm64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
  local os; os=$(uname -s | tr '[:upper:]' '[:lower:]')
  local module="golang.org/toolchain@v0.0.1-go$GO_VERSION.$os-$arch"
  log "fetching Go $GO_VERSION: go mod download $module"
  local dir; dir=$(GOMODCACHE="$cache/go/mod" GOFLAGS=-modcacherw GO111MODULE=on go mod download -json "$module" |
    json_field Dir)
  # Module zips keep no file modes: make its programs executable, as `go` does when it
  # switches to a downloaded toolchain.
  chmod -R a+x "$dir/bin" "$dir/pkg/tool"
  echo "$dir"
}
# Hold the component's lock while building it or finding it cached: a second build of the
# same component (another clone, CI while a demo builds) waits, then finds it cached.
lock() {
  mkdir -p "$cache/locks"
  exec 9>"$cache/locks/$1.lock"
  if ! flock -n 9; then
    log "$1: another build of it runs (lock $cache/locks/$1.lock): waiting for it"
    flock 9
  fi
}
unlock() { exec 9>&-; }

build_kubernetes() {
  local v=$K8S_VERSION dir="$cache/bin/kubernetes-$K8S_VERSION"
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  if have "$dir" "${bins[@]}"; then log "kubernetes $v: cached"; echo "KUBERNETES_BIN=$dir"; return; fi
  need_go
  log "kubernetes $v: building ${bins[*]} (a cold build takes a while on 2 cores)"
  local work; new_work
  local minor=${v#v1.}; minor=${minor%%.*}
  local staging_version="v0.${v#v1.}"
  # k8s.io/kubernetes replaces its staging modules with local paths, so it cannot be
  # built as a dependency directly: pin each staging module to its published version.
  local gomod; gomod=$(go mod download -json "k8s.io/kubernetes@$v" | json_field GoMod)
  local staging; staging=$(sed -n 's#^\s*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod" | sort -u)
  [ -n "$staging" ] || { log "no staging replaces found in $gomod"; exit 1; }
  (
    cd "$work"
    go mod init kubeonnx.local/k8s-build >/dev/null 2>&1
    for m in $staging; do go mod edit -replace "$m=$m@$staging_version"; done
    local pkgs=(); for b in "${bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b@$v"); done
    go get "${pkgs[@]}" >&2
    local pkg="k8s.io/component-base/version" cg="k8s.io/client-go/pkg/version"
    local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    local ld="-s -w"
    for p in $pkg $cg; do
      ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$date"
    done
    mkdir -p out
    for b in "${bins[@]}"; do
      log "  go build $b"
      go build -ldflags "$ld" -o "out/$b" "k8s.io/kubernetes/cmd/$b"
    done
    mkdir -p "$cache/bin" && rm -rf "$dir" && mv out "$dir"
  )
  echo "KUBERNETES_BIN=$dir"
}

build_etcd() {
  local v=$ETCD_VERSION dir="$cache/bin/etcd-$ETCD_VERSION"
  if have "$dir" etcd; then log "etcd $v: cached"; echo "ETCD_BIN=$dir"; return; fi
  need_go
  log "etcd $v: building"
  local work; new_work
  (
    cd "$work"
    go mod init kubeonnx.local/etcd-build >/dev/null 2>&1
    # The server module replaces its sibling modules with local paths, as kubernetes does.
    for m in go.etcd.io/etcd/api/v3 go.etcd.io/etcd/client/pkg/v3 go.etcd.io/etcd/client/v3 go.etcd.io/etcd/pkg/v3; do
      go mod edit -replace "$m=$m@$v"
    done
    go get "go.etcd.io/etcd/server/v3@$v" >&2
    mkdir -p out
    go build -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$v" -o out/etcd go.etcd.io/etcd/server/v3
    mkdir -p "$cache/bin" && rm -rf "$dir" && mv out "$dir"
  )
  echo "ETCD_BIN=$dir"
}

build_installable() {  # NAME VERSION PACKAGE LDFLAGS VAR
  local name=$1 v=$2 pkg=$3 ld=$4 var=$5 dir="$cache/bin/$1-$2"
  if have "$dir" "$name"; then log "$name $v: cached"; echo "$var=$dir"; return; fi
  need_go
  log "$name $v: building"
  local work; new_work
  GOBIN="$work/out" go install -ldflags "-s -w $ld" "$pkg@$v"
  mkdir -p "$cache/bin" && rm -rf "$dir" && mv "$work/out" "$dir"
  echo "$var=$dir"
}

build_kwok() {
  local v=$KWOK_VERSION dir="$cache/bin/kwok-$KWOK_VERSION"
  if have "$dir" kwok stages.yaml metrics.yaml; then log "kwok $v: cached"; echo "KWOK_BIN=$dir"; return; fi
  if ! have "$dir" kwok; then  # a cache of before metrics.yaml keeps its binary
    rm -rf "$dir"
    build_installable kwok "$v" sigs.k8s.io/kwok/cmd/kwok \
      "-X sigs.k8s.io/kwok/pkg/consts.Version=$v" KWOK_BIN >/dev/null
  fi
  need_go
  local src; src=$(go mod download -json "sigs.k8s.io/kwok@$v" | json_field Dir)/kustomize
  # kwok needs Stage objects to drive node and pod status; take the "fast" set shipped in
  # its own module (already in the module cache from the build above).
  local f out="$dir/stages.yaml"; : > "$out.tmp"
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    printf -- '---\n' >> "$out.tmp"; cat "$src/stage/$f" >> "$out.tmp"
  done
  mv "$out.tmp" "$out"
  # And its simulation of each node's kubelet /metrics/resource (what metrics-server reads),
  # with each pod's usage taken from its kwok.x-k8s.io/usage-cpu and -memory annotations.
  out="$dir/metrics.yaml"; : > "$out.tmp"
  for f in metrics/resource/metrics-resource.yaml metrics/usage/usage-from-annotation.yaml; do
    printf -- '---\n' >> "$out.tmp"; cat "$src/$f" >> "$out.tmp"
  done
  mv "$out.tmp" "$out"
  echo "KWOK_BIN=$dir"
}

build_prometheus() {
  local v=$PROMETHEUS_VERSION dir="$cache/bin/prometheus-$PROMETHEUS_VERSION"
  if have "$dir" prometheus promtool; then log "prometheus $v: cached"; echo "PROMETHEUS_BIN=$dir"; return; fi
  need_go
  log "prometheus $v: building prometheus promtool (a cold build takes a while on 2 cores)"
  local work; new_work
  # The module has no replace directives, so `go install pkg@version` builds it as pinned.
  # Built without the web UI's assets (tag builtinassets): the tests use the HTTP API only.
  # Its release version (the module v0.3XX.Y is Prometheus 3.XX.Y) is in the module's VERSION.
  local src; src=$(go mod download -json "github.com/prometheus/prometheus@$v" | json_field Dir)
  local p=github.com/prometheus/common/version
  GOBIN="$work/out" go install -ldflags "-s -w -X $p.Version=$(cat "$src/VERSION") -X $p.Revision=$v -X $p.Branch=$v" \
    "github.com/prometheus/prometheus/cmd/prometheus@$v" "github.com/prometheus/prometheus/cmd/promtool@$v"
  mkdir -p "$cache/bin" && rm -rf "$dir" && mv "$work/out" "$dir"
  echo "PROMETHEUS_BIN=$dir"
}

build_keda() {
  local v=$KEDA_VERSION dir="$cache/bin/keda-$KEDA_VERSION"
  # keda: the operator; keda-adapter: its metrics API server (external.metrics.k8s.io, what
  # the HPA KEDA creates reads above one replica).
  local bins=(keda keda-adapter crds/keda.sh_scaledobjects.yaml)
  if have "$dir" "${bins[@]}"; then log "keda $v: cached"; echo "KEDA_BIN=$dir"; return; fi
  need_go
  # A cache of before the adapter keeps its operator and CRDs: only what is missing is built.
  local missing=() b
  for b in keda keda-adapter; do have "$dir" "$b" || missing+=("$b"); done
  have "$dir" crds/keda.sh_scaledobjects.yaml || missing+=(crds)
  log "keda $v: building ${missing[*]} (a cold build takes a while on 2 cores)"
  local work; new_work
  (
    cd "$work"
    go mod init kubeonnx.local/keda-build >/dev/null 2>&1
    # A dependency's replace and exclude directives are ignored: repeat KEDA's own so the
    # build uses the module graph its release was tested with.
    local gomod; gomod=$(go mod download -json "github.com/kedacore/keda/v2@$v" | json_field GoMod)
    local r
    while read -r r; do go mod edit -replace "$r"; done < <(
      sed -n 's#^replace \([^ ]*\) \([^ ]*\) => \([^ ]*\) \([^ ]*\)$#\1@\2=\3@\4#p' "$gomod")
    while read -r r; do go mod edit -exclude "$r"; done < <(sed -n 's#^exclude \([^ ]*\) \([^ ]*\)$#\1@\2#p' "$gomod")
    go get "github.com/kedacore/keda/v2/cmd/operator@$v" "github.com/kedacore/keda/v2/cmd/adapter@$v" >&2
    mkdir -p out
    local ld="-s -w -X github.com/kedacore/keda/v2/version.Version=${v#v} -X github.com/kedacore/keda/v2/version.GitCommit=$v"
    have "$dir" keda || go build -ldflags "$ld" -o out/keda github.com/kedacore/keda/v2/cmd/operator
    have "$dir" keda-adapter || go build -ldflags "$ld" -o out/keda-adapter github.com/kedacore/keda/v2/cmd/adapter
    # The custom resource definitions of this version, for the e2e cluster.
    if ! have "$dir" crds/keda.sh_scaledobjects.yaml; then
      mkdir -p out/crds
      cp "$(go mod download -json "github.com/kedacore/keda/v2@$v" | json_field Dir)"/config/crd/bases/*.yaml out/crds/
    fi
    # Each piece moves in whole (copied beside it, then renamed over), so a run using the
    # cached operator meanwhile never sees a half-written file nor a missing one.
    mkdir -p "$dir"
    local f
    for f in out/*; do
      f=${f#out/}
      rm -rf "$dir/.$f.tmp" && cp -a "out/$f" "$dir/.$f.tmp"
      [ ! -d "$dir/$f" ] || rm -rf "${dir:?}/$f"  # a directory cannot be renamed over
      mv -T "$dir/.$f.tmp" "$dir/$f"
    done
  )
  echo "KEDA_BIN=$dir"
}

# Helm reports (and checks charts' kubeVersion against) the client-go it was built with.
helm_k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local p
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    printf -- '-X %s.k8sVersionMajor=1 -X %s.k8sVersionMinor=%s ' "$p" "$p" "$minor"
  done
}

case ${1:-} in
  --check-go) problem=$(go_problem); [ -z "$problem" ] || { log "$problem"; exit 3; }; exit 0 ;;
  --fetch-go) fetch_go; exit 0 ;;
esac

want=${*:-kubernetes etcd kwok helm}
for c in $want; do
  lock "$c"
  case $c in
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    kwok) build_kwok ;;
    helm) build_installable helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
            "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean $(helm_k8s_ldflags)" HELM_BIN ;;
    prometheus) build_prometheus ;;
    keda) build_keda ;;
    # No replace directives in its go.mod: `go install pkg@version` builds it as pinned. Its
    # version is client-go's (what `metrics-server --version` prints), as its Makefile sets it.
    metrics-server) build_installable metrics-server "$METRICS_SERVER_VERSION" \
            sigs.k8s.io/metrics-server/cmd/metrics-server \
            "-X k8s.io/client-go/pkg/version.gitVersion=$METRICS_SERVER_VERSION -X k8s.io/client-go/pkg/version.gitTreeState=clean" METRICS_SERVER_BIN ;;
    *) log "unknown component: $c"; exit 2 ;;
  esac
  unlock
done
