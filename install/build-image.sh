#!/usr/bin/env bash
# Builds the Trow container image (install/Containerfile) from a binary that
# is already built, with podman (or buildah when podman is missing). Nothing
# is downloaded: the image starts from `scratch`.
#
#   install/build-image.sh [--binary PATH] [--revision REV] [--source URL] [TAG]
#
#   TAG         the image name (default: trow:<version>, which podman stores
#               as localhost/trow:<version>)
#   --binary    the trow binary to package (default: the release build,
#               target/<host tuple>/release/trow; build it first with
#               `cargo build --release`). The tests pass their debug build.
#   --revision  the source revision for the image label (default: the git
#               commit, with -dirty when tracked files have changed)
#   --source    the source repository URL for the image label
#
# The version label is what the binary reports (`trow --version`). The image
# creation time and the files' times are the commit's time (or
# SOURCE_DATE_EPOCH), so the same binary and revision give the same image.
#
# Environment: TROW_IMAGE_BUILDER=podman|buildah picks the builder;
# CONTAINERS_STORAGE_CONF and CONTAINERS_CONF select another storage or
# engine configuration, as for any podman command.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

binary=""
revision=""
source_url="https://github.com/trow-registry/trow"
tag=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --revision) revision="${2:?--revision needs a value}"; shift 2 ;;
        --revision=*) revision="${1#*=}"; shift ;;
        --source) source_url="${2:?--source needs a URL}"; shift 2 ;;
        --source=*) source_url="${1#*=}"; shift ;;
        -h|--help) usage ;;
        -*) echo "build-image.sh: unknown option $1" >&2; usage ;;
        *)
            [ -z "$tag" ] || { echo "build-image.sh: one TAG only" >&2; usage; }
            tag="$1"; shift ;;
    esac
done

if [ -z "$binary" ]; then
    host="$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')" || true
    if [ -z "$host" ]; then
        echo "build-image.sh: rustc not found; name the binary with --binary" >&2
        exit 1
    fi
    binary="$repo/target/$host/release/trow"
fi
if [ ! -x "$binary" ]; then
    echo "build-image.sh: $binary is not an executable; run \`cargo build --release\` first, or pass --binary" >&2
    exit 1
fi

# `trow --version` prints `trow 0.1.0`.
version="$("$binary" --version | awk '{print $2}')"
if [ -z "$version" ]; then
    echo "build-image.sh: \`$binary --version\` printed no version" >&2
    exit 1
fi
tag="${tag:-trow:$version}"

in_git() { git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; }
if [ -z "$revision" ]; then
    if in_git; then
        revision="$(git -C "$repo" rev-parse HEAD)"
        git -C "$repo" diff --quiet HEAD -- 2>/dev/null || revision="$revision-dirty"
    else
        revision=unknown
    fi
fi
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && in_git; then
    SOURCE_DATE_EPOCH="$(git -C "$repo" log -1 --format=%ct)"
fi

builder="${TROW_IMAGE_BUILDER:-}"
if [ -z "$builder" ]; then
    if command -v podman >/dev/null; then builder=podman
    elif command -v buildah >/dev/null; then builder=buildah
    else
        echo "build-image.sh: neither podman nor buildah is installed" >&2
        exit 1
    fi
fi

# The build context: the binary (a hard link when possible, else a copy)
# and the empty directory that becomes /data.
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
ln "$binary" "$context/trow" 2>/dev/null || cp "$binary" "$context/trow"
mkdir "$context/data"

args=(build --layers=false --format oci
    --file "$here/Containerfile"
    --build-arg "VERSION=$version"
    --build-arg "REVISION=$revision"
    --build-arg "SOURCE=$source_url"
    --tag "$tag")
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    args+=(--timestamp "$SOURCE_DATE_EPOCH")
fi
"$builder" "${args[@]}" "$context"

echo "built $tag (trow $version, revision $revision)" >&2
