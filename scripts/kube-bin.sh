#!/usr/bin/env bash
# Makes the real Kubernetes control-plane binaries used by Knarr's tests
# available and prints the directory that holds them.
#
#   kube-apiserver  kube-controller-manager  kubectl   (k8s.io/kubernetes)
#   etcd                                               (go.etcd.io/etcd/server/v3)
#
# stdout gets exactly one line, the directory; all progress goes to stderr.
#
# - KNARR_KUBE_BIN=DIR: use DIR as it is (it must hold all four executables).
# - Otherwise the binaries are built from Go modules (only the Go module proxy
#   is needed) and cached OUTSIDE the checkout, keyed by version:
#     ${KNARR_CACHE:-$HOME/.cache/knarr}/kube/<k8s>-etcd-<etcd>/bin/
#   A cache hit returns at once. A build is done under an flock, in a temporary
#   directory that is renamed into place only when all four binaries are built,
#   so a concurrent caller waits instead of building twice and an interrupted
#   build never leaves a half cache behind.
#
# The wrapper Go modules live in <cache>/kube/src/{k8s,etcd}-<version>.
# GOCACHE and GOMODCACHE are left at their defaults so later builds reuse them.
# On 2 cores a cold build (empty GOMODCACHE and GOCACHE) took 11.5 min, 8 of
# them for kube-apiserver; with a warm GOCACHE a rebuild takes about 20 s. See shared/KUBERNETES.md section 4 for the sources of these facts.
set -euo pipefail

K8S_VERSION="v1.34.4"      # k8s.io/kubernetes
STAGING_VERSION="v0.34.4"  # every k8s.io staging module, same release
K8S_GIT_MAJOR="1"
K8S_GIT_MINOR="34"
ETCD_VERSION="v3.6.16"     # go.etcd.io/etcd/*/v3

# k8s.io/kubernetes requires each of these at v0.0.0 and replaces it with
# ./staging/src/k8s.io/<m>; a consumer has to replace every one with a real
# version. Checked against k8s.io/kubernetes@${K8S_VERSION}'s go.mod on each
# build (a mismatch fails the build).
STAGING_MODULES=(
    api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
    cloud-provider cluster-bootstrap code-generator component-base
    component-helpers controller-manager cri-api cri-client csi-translation-lib
    dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
    kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
    mount-utils pod-security-admission sample-apiserver sample-cli-plugin
    sample-controller
)

ETCD_MODULES=(server/v3 api/v3 client/pkg/v3 client/v3 pkg/v3)

BINARIES=(kube-apiserver kube-controller-manager kubectl etcd)

# Only the final directory may reach stdout: keep it on fd 3, send the rest
# (our messages and every tool's output) to stderr.
exec 3>&1 1>&2

log() { echo "kube-bin: $*" >&2; }
die() { echo "kube-bin: $*" >&2; exit 1; }

# has_all DIR: true when DIR holds all four executables.
has_all() {
    local b
    for b in "${BINARIES[@]}"; do
        [[ -f "$1/$b" && -x "$1/$b" ]] || return 1
    done
}

# ---- KNARR_KUBE_BIN: a directory given by the caller ----------------------
if [[ -n "${KNARR_KUBE_BIN:-}" ]]; then
    [[ -d "$KNARR_KUBE_BIN" ]] || die "KNARR_KUBE_BIN=$KNARR_KUBE_BIN is not a directory"
    for b in "${BINARIES[@]}"; do
        if [[ ! -f "$KNARR_KUBE_BIN/$b" || ! -x "$KNARR_KUBE_BIN/$b" ]]; then
            die "KNARR_KUBE_BIN=$KNARR_KUBE_BIN has no executable '$b'"
        fi
    done
    echo "$(cd "$KNARR_KUBE_BIN" && pwd)" >&3
    exit 0
fi

# ---- the cache ------------------------------------------------------------
cache_root="${KNARR_CACHE:-${HOME:?HOME is not set and KNARR_CACHE is not given}/.cache/knarr}"
kube_cache="$cache_root/kube"
key="${K8S_VERSION}-etcd-${ETCD_VERSION}"
final="$kube_cache/$key"
bin="$final/bin"

# Fast path: a complete cache needs no lock (it only ever appears by rename).
if has_all "$bin"; then
    echo "$bin" >&3
    exit 0
fi

mkdir -p "$kube_cache" || die "creating $kube_cache failed"
lockfile="$kube_cache/$key.lock"
exec 9>"$lockfile" || die "opening lock $lockfile failed"
if ! flock -n 9; then
    log "another build of $key holds $lockfile; waiting for it"
    flock 9 || die "taking lock $lockfile failed"
fi

# Someone may have finished the build while we waited.
if has_all "$bin"; then
    echo "$bin" >&3
    exit 0
fi

command -v go >/dev/null || die "checking for go failed: no 'go' on PATH"

# We hold the lock, so any temporary build directory left here belongs to a
# build that was killed outright (SIGKILL, power loss): clear it away.
rm -rf "$kube_cache/.$key.tmp."* "$kube_cache/.$key.old."*

tmp="$(mktemp -d "$kube_cache/.$key.tmp.XXXXXX")" || die "creating a temporary directory under $kube_cache failed"
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
chmod 755 "$tmp" || die "creating a temporary directory under $kube_cache failed"
mkdir -p "$tmp/bin"

# A go.work further up would change what gets built; don't let it.
export GOWORK=off

# step NAME CMD...: run CMD; on failure exit naming the step.
step() {
    local name="$1"; shift
    local rc=0
    "$@" || rc=$?
    if [[ $rc -ne 0 ]]; then
        log "the failing command: $*"
        die "$name failed: exit status $rc (its output is above)"
    fi
}

# in_dir DIR CMD...: run CMD in DIR.
in_dir() { local d="$1"; shift; (cd "$d" && "$@"); }

# timed NAME CMD...: like step, and logs how long it took.
timed() {
    local name="$1"; shift
    local start=$SECONDS
    log "$name ..."
    step "$name" "$@"
    log "$name took $((SECONDS - start))s"
}

log "building Kubernetes $K8S_VERSION and etcd $ETCD_VERSION into $bin (go: $(go version))"
total_start=$SECONDS

# ---- Kubernetes -----------------------------------------------------------
k8s_src="$kube_cache/src/k8s-$K8S_VERSION"
mkdir -p "$k8s_src" || die "creating $k8s_src failed"

# Check the staging list against the real go.mod of k8s.io/kubernetes.
k8s_gomod="$(cd "$tmp" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')" ||
    die "downloading k8s.io/kubernetes@$K8S_VERSION failed"
[[ -n "$k8s_gomod" && -f "$k8s_gomod" ]] ||
    die "downloading k8s.io/kubernetes@$K8S_VERSION failed: no go.mod reported"
want="$(printf '%s\n' "${STAGING_MODULES[@]}" | sort)"
have="$(sed -n 's#^[[:space:]]*k8s\.io/\([^[:space:]]*\) => \./staging/src/k8s\.io/\1[[:space:]]*$#\1#p' "$k8s_gomod" | sort)"
if [[ "$want" != "$have" ]]; then
    log "staging modules listed here vs. replaced in $k8s_gomod:"
    diff <(echo "$want") <(echo "$have") >&2 || true
    die "checking the staging module list against k8s.io/kubernetes@$K8S_VERSION failed"
fi
log "staging list matches k8s.io/kubernetes@$K8S_VERSION go.mod (${#STAGING_MODULES[@]} modules)"

{
    echo "// Generated by scripts/kube-bin.sh; rewritten on every build."
    echo "module knarr.local/kube-bin/k8s"
    echo
    echo "go 1.24.0"
    echo
    echo "// as k8s.io/kubernetes' own go.mod"
    echo "godebug default=go1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "tool ("
    echo "	k8s.io/kubernetes/cmd/kube-apiserver"
    echo "	k8s.io/kubernetes/cmd/kube-controller-manager"
    echo "	k8s.io/kubernetes/cmd/kubectl"
    echo ")"
    echo
    echo "replace ("
    for m in "${STAGING_MODULES[@]}"; do
        echo "	k8s.io/$m => k8s.io/$m $STAGING_VERSION"
    done
    echo ")"
} >"$k8s_src/go.mod" || die "writing $k8s_src/go.mod failed"

timed "resolving the Kubernetes modules (go mod tidy)" \
    in_dir "$k8s_src" go mod tidy

got="$(cd "$k8s_src" && go list -m -f '{{.Version}}' k8s.io/kubernetes)" ||
    die "checking the k8s.io/kubernetes version failed"
[[ "$got" == "$K8S_VERSION" ]] ||
    die "checking the k8s.io/kubernetes version failed: resolved $got, want $K8S_VERSION"

k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION"
    k8s_ldflags+=" -X $pkg.gitMajor=$K8S_GIT_MAJOR"
    k8s_ldflags+=" -X $pkg.gitMinor=$K8S_GIT_MINOR"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean"
done

# As Kubernetes' own hack/lib/golang.sh builds its static release binaries.
for b in kube-apiserver kube-controller-manager kubectl; do
    timed "building $b" in_dir "$k8s_src" env CGO_ENABLED=0 go build -mod=mod -trimpath \
        -tags=selinux,notest,grpcnotrace -ldflags "$k8s_ldflags" -o "$tmp/bin/$b" \
        "k8s.io/kubernetes/cmd/$b"
done

# ---- etcd -----------------------------------------------------------------
etcd_src="$kube_cache/src/etcd-$ETCD_VERSION"
mkdir -p "$etcd_src" || die "creating $etcd_src failed"
{
    echo "// Generated by scripts/kube-bin.sh; rewritten on every build."
    echo "module knarr.local/kube-bin/etcd"
    echo
    echo "go 1.24.0"
    echo
    echo "require ("
    for m in "${ETCD_MODULES[@]}"; do
        echo "	go.etcd.io/etcd/$m $ETCD_VERSION"
    done
    echo ")"
    echo
    echo "tool go.etcd.io/etcd/server/v3"
} >"$etcd_src/go.mod" || die "writing $etcd_src/go.mod failed"

timed "resolving the etcd modules (go mod tidy)" \
    in_dir "$etcd_src" go mod tidy

for m in "${ETCD_MODULES[@]}"; do
    got="$(cd "$etcd_src" && go list -m -f '{{.Version}}' "go.etcd.io/etcd/$m")" ||
        die "checking the go.etcd.io/etcd/$m version failed"
    [[ "$got" == "$ETCD_VERSION" ]] ||
        die "checking the go.etcd.io/etcd/$m version failed: resolved $got, want $ETCD_VERSION"
done

# The package's last path element is "v3", so name the binary with -o.
timed "building etcd" in_dir "$etcd_src" env CGO_ENABLED=0 go build -mod=mod -trimpath \
    -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$ETCD_VERSION" \
    -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3

# ---- check and move into place ------------------------------------------------
step "checking the built binaries" has_all "$tmp/bin"
step "running kube-apiserver --version" "$tmp/bin/kube-apiserver" --version
step "running kube-controller-manager --version" "$tmp/bin/kube-controller-manager" --version
step "running kubectl version --client" "$tmp/bin/kubectl" version --client
step "running etcd --version" "$tmp/bin/etcd" --version

{
    echo "k8s.io/kubernetes $K8S_VERSION (staging $STAGING_VERSION)"
    echo "go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    go version
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - total_start))s"
} >"$tmp/BUILD-INFO" || die "writing $tmp/BUILD-INFO failed"

old=""
if [[ -e "$final" ]]; then
    # An incomplete leftover (say, a binary deleted by hand): move it aside.
    old="$kube_cache/.$key.old.$$"
    step "moving the incomplete $final aside" mv -T "$final" "$old"
fi
step "moving the build into $final" mv -T "$tmp" "$final"
[[ -z "$old" ]] || rm -rf "$old"

log "built all four binaries in $((SECONDS - total_start))s"
ls -l "$bin" >&2
echo "$bin" >&3
