#!/usr/bin/env bash
# Renders the flat install files from the kustomize layout:
#
#   install/trow.yaml      install/base
#   install/trow-pvc.yaml  install/overlays/pvc
#   install/trow-gke.yaml  install/overlays/pvc (the same: GKE needs nothing
#                          else; the name is the one the user guide uses)
#   install/trow-webhooks.yaml  install/overlays/webhooks (the base with the
#                          admission webhooks)
#
#   install/render.sh [OUTDIR]     (default: install/)
#
# Run it after changing anything under install/base or install/overlays,
# and commit the result: tests/install.rs fails when the committed files
# differ from a fresh rendering.
#
# The files are rendered with the kustomize that Debian's kubectl 1.20
# embeds (kustomize v2.0.3, package kubernetes-client), which is what CI
# uses (.ci/run): other kustomize versions order some documents
# differently. TROW_KUBECTL names that kubectl when `kubectl` on PATH is
# another one; TROW_RENDER_ANY_KUSTOMIZE=1 renders with whatever it is
# (tests/install.rs does, to compare documents rather than bytes).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
kubectl="${TROW_KUBECTL:-kubectl}"
pinned=v2.0.3

# kubectl 1.21 and later print their kustomize version; 1.14 to 1.20
# embed v2.0.3 and do not say so.
version_text="$("$kubectl" version --client 2>/dev/null || true)"
kustomize="$(sed -n 's/^Kustomize Version: //p' <<<"$version_text")"
if [ -z "$kustomize" ]; then
    if grep -Eq 'GitVersion:"v1\.(1[4-9]|20)\.' <<<"$version_text"; then
        kustomize=$pinned
    else
        echo "render.sh: cannot tell the kustomize version of \`$kubectl\`" >&2
        exit 1
    fi
fi
if [ "$kustomize" != "$pinned" ] && [ "${TROW_RENDER_ANY_KUSTOMIZE:-0}" != 1 ]; then
    cat >&2 <<EOF
render.sh: \`$kubectl\` embeds kustomize $kustomize; the install files are
rendered with $pinned (Debian's kubectl 1.20, package kubernetes-client).
Unpack it beside your kubectl and point TROW_KUBECTL at it:
  apt-get download kubernetes-client && dpkg-deb -x kubernetes-client_*.deb /opt/kubernetes-client
  TROW_KUBECTL=/opt/kubernetes-client/usr/bin/kubectl install/render.sh
EOF
    exit 1
fi

render() {
    local file="$1" dir="$2"
    {
        echo "# Trow for Kubernetes: kubectl apply -f install/$file (INSTALL.md)."
        echo "# Rendered by install/render.sh from install/$dir: do not edit"
        echo "# this file; change install/base or install/overlays, then render."
        "$kubectl" kustomize "$here/$dir"
    } >"$out/$file.tmp"
    mv "$out/$file.tmp" "$out/$file"
}

mkdir -p "$out"
render trow.yaml base
render trow-pvc.yaml overlays/pvc
render trow-gke.yaml overlays/pvc
render trow-webhooks.yaml overlays/webhooks
