#!/usr/bin/env bash
# Build the llamaft container images, also on a machine that reaches no image registry.
#
#     scripts/build_image.sh cpu      # -> llamaft-cpu; then: podman run --rm --network=none llamaft-cpu
#     scripts/build_image.sh gpu      # -> llamaft-gpu (its CUDA base image must come from a registry)
#     ENGINE=docker TAG=me/llamaft:cpu scripts/build_image.sh cpu
#
# What it does, so it can be done by hand:
# 1. Base image (cpu, BASE not given): pull docker.io/library/debian:bookworm-slim; when no registry
#    answers, make a minimal Debian rootfs with debootstrap (root; `apt-get install podman debootstrap`)
#    and import it as localhost/llamaft-debian-base (reused by later runs; `podman rmi` it to redo).
# 2. pip inside the build uses THIS machine's pip settings (`pip config list`: a mirror index, local
#    wheel folders, a CA bundle for a TLS-inspecting proxy): they are written to a pip.conf for the
#    build and every local path they name is mounted read-only into the RUN steps (podman/buildah
#    `build --volume`; plain `docker build` cannot mount, so with docker pip uses the image's defaults).
#    The image keeps neither the file nor the mounts.
# 3. torch: from download.pytorch.org (the Dockerfile's TORCH_INDEX) when it answers; otherwise
#    TORCH_INDEX is left empty and pip's settings from step 2 must provide the build (here: /opt/wheels).
# 4. `ENGINE build --network=host -f docker/Dockerfile.KIND ...`: host network so that the build
#    resolves names the way this machine does.
#
# Env: ENGINE (podman, else docker), TAG (llamaft-KIND), BASE (skip step 1), SUITE (bookworm),
# MIRROR (http://deb.debian.org/debian), TORCH_INDEX (skip the check in 3), PIP (python3 -m pip),
# PIP_CONSTRAINT (constraints.txt: the tested versions),
# BUILD_FLAGS (more `build` flags; a sandbox that crun cannot run in may need
# "--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768": docs/docker-smoke.md).
set -euo pipefail
cd "$(dirname "$0")/.."

kind="${1:-}"
[[ "$kind" == cpu || "$kind" == gpu ]] || { echo "usage: $0 cpu|gpu" >&2; exit 2; }
ENGINE="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
TAG="${TAG:-llamaft-$kind}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
LOCAL_BASE="localhost/llamaft-debian-base:$SUITE"
args=(--network=host -f "docker/Dockerfile.$kind" -t "$TAG")

debian_base() {  # step 1: an official Debian image, else one made with debootstrap
    local official="docker.io/library/debian:$SUITE-slim" root
    if "$ENGINE" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then echo "$LOCAL_BASE"; return; fi
    if timeout 120 "$ENGINE" pull -q "$official" >/dev/null 2>&1; then echo "$official"; return; fi
    echo "== no registry: building $LOCAL_BASE with debootstrap ($SUITE from $MIRROR)" >&2
    command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 2; }
    root="$(mktemp -d /var/tmp/llamaft-rootfs.XXXXXX)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR" >&2
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    # An imported tarball has no environment: give it the PATH an official image has.
    tar -C "$root" -c . | "$ENGINE" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >&2
    rm -rf "$root"
    echo "$LOCAL_BASE"
}

if [[ -n "${BASE:-}" ]]; then args+=(--build-arg "BASE=$BASE")
elif [[ "$kind" == cpu ]]; then base="$(debian_base)"; args+=(--build-arg "BASE=$base"); fi

# Step 2: this machine's pip settings, paths moved under /run/llamaft-build/host and mounted there.
if [[ "$ENGINE" != docker ]]; then
    conf="$(mktemp -d)"
    trap 'rm -rf "$conf"' EXIT
    chmod 755 "$conf"  # the build's pip runs as the image's user, not root
    ${PIP:-python3 -m pip} config list 2>/dev/null | python3 -c '
import re, sys
settings = {}
for line in sys.stdin:  # global.find-links=... then :env:.find-links=... (the environment wins, as in pip)
    m = re.match(r"^(?:global|install|:env:)\.([\w-]+)=(.*)$", line.strip())
    if m:
        settings[m[1]] = m[2].strip("\x27\"")
mounts, out = set(), ["[global]"]
def move(word):  # /abs/path or file:///abs/path -> the same under /run/llamaft-build/host
    path = word[len("file://"):] if word.startswith("file://") else word
    if not path.startswith("/"):
        return word
    mounts.add(re.sub(r"/simple/?$", "", path))  # a file:// index links to ../../files: mount its parent
    return word.replace(path, "/run/llamaft-build/host" + path)
for key, value in settings.items():
    out.append(f"{key} = " + " ".join(move(w) for w in value.split()))
open(sys.argv[1] + "/pip.conf", "w").write("\n".join(out) + "\n")
print("\n".join(sorted(mounts)))
' "$conf" > "$conf/mounts"
    echo "== pip settings for the build:"; sed 's/^/   /' "$conf/pip.conf"
    args+=(--volume "$conf:/run/llamaft-build/conf:ro" --build-arg PIP_CONFIG_FILE=/run/llamaft-build/conf/pip.conf)
    while read -r path; do
        [[ -e "$path" ]] && args+=(--volume "$path:/run/llamaft-build/host$path:ro")
    done < "$conf/mounts"
fi

# Step 3: torch's own index, when it answers.
if [[ -n "${TORCH_INDEX+set}" ]]; then args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
elif ! python3 -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/", timeout=15)' 2>/dev/null; then
    echo "== download.pytorch.org unreachable: torch from pip's settings (TORCH_INDEX=)"
    args+=(--build-arg "TORCH_INDEX=")
fi

# PIP_CONSTRAINT=constraints.txt: the exact versions the test suite last passed with (none: newest).
args+=(--build-arg "PIP_CONSTRAINT=${PIP_CONSTRAINT:-}")
read -ra extra <<< "${BUILD_FLAGS:-}"
args+=("${extra[@]}")

echo "== $ENGINE build ${args[*]} ."
start=$(date +%s)
"$ENGINE" build "${args[@]}" .
echo "== built $TAG in $(( $(date +%s) - start )) s"
"$ENGINE" image ls "$TAG"
