#!/usr/bin/env python3
"""An independent cosign signer for tests/signatures.rs (never Trow's code).

keygen DIR
    Writes a new ECDSA P-256 key pair: DIR/cosign.pub (SPKI PEM, what
    `cosign public-key` prints) and DIR/plain.key (PKCS#8 PEM).

attach BASE_URL REPO IMAGE_DIGEST PLAIN_KEY MODE [USER:PASSWORD]
    Signs IMAGE_DIGEST with PLAIN_KEY (ECDSA P-256, SHA-256, DER) into a
    cosign simple-signing payload and pushes it with plain HTTP requests
    (OCI Distribution API): MODE `referrer` pushes a manifest whose subject
    is the image (cosign's OCI 1.1 form, artifactType
    application/vnd.dev.cosign.artifact.sig.v1+json); MODE `tag` pushes it
    under the tag sha256-<hex>.sig. Prints the signature manifest's digest.

Uses only `cryptography` (OpenSSL) and the standard library. (Debian's
skopeo, podman and buildah are built with sigstore signing disabled, so
they cannot sign here.)
"""

import base64
import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"


def keygen(out_dir):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(os.path.join(out_dir, "cosign.pub"), "wb") as f:
        f.write(
            key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )
    with open(os.path.join(out_dir, "plain.key"), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def request(method, url, body=None, headers=None, auth=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.headers, resp.read()


def push_blob(base, repo, data, auth):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _, headers, _ = request("POST", f"{base}/v2/{repo}/blobs/uploads/", b"", auth=auth)
    # Follow the Location's path on the registry we talk to, even when it
    # names the registry by a public hostname this machine cannot resolve.
    parts = urllib.parse.urlsplit(headers["Location"])
    location = base + urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
    sep = "&" if "?" in location else "?"
    request(
        "PUT",
        f"{location}{sep}digest={digest}",
        data,
        {"Content-Type": "application/octet-stream"},
        auth,
    )
    return digest


def attach(base, repo, image_digest, key_path, mode, auth=None):
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": repo},
                "image": {"docker-manifest-digest": image_digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    payload_digest = push_blob(base, repo, payload, auth)
    config = b"{}"
    config_digest = push_blob(base, repo, config, auth)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY, "digest": config_digest, "size": len(config)},
        "layers": [
            {
                "mediaType": SIMPLESIGNING,
                "digest": payload_digest,
                "size": len(payload),
                "annotations": {"dev.cosignproject.cosign/signature": signature},
            }
        ],
    }
    if mode == "referrer":
        accept = ",".join(
            [
                OCI_MANIFEST,
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
            ]
        )
        _, headers, _ = request(
            "HEAD", f"{base}/v2/{repo}/manifests/{image_digest}", None, {"Accept": accept}, auth
        )
        manifest["artifactType"] = SIG_ARTIFACT
        manifest["subject"] = {
            "mediaType": headers["Content-Type"],
            "digest": image_digest,
            "size": int(headers["Content-Length"]),
        }
    body = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if mode == "referrer":
        reference = digest
    elif mode == "tag":
        reference = image_digest.replace(":", "-") + ".sig"
    else:
        raise SystemExit(f"unknown mode {mode}")
    request(
        "PUT",
        f"{base}/v2/{repo}/manifests/{reference}",
        body,
        {"Content-Type": OCI_MANIFEST},
        auth,
    )
    print(digest)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "keygen":
        keygen(sys.argv[2])
    elif len(sys.argv) in (7, 8) and sys.argv[1] == "attach":
        attach(*sys.argv[2:7], sys.argv[7] if len(sys.argv) == 8 else None)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
