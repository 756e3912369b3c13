#!/usr/bin/env python3
"""A small command-line front end to oras-py (the `oras` package on PyPI),
driven by tests/interop_oras.rs. oras-py has no command-line tool of its
own: this script calls its Python API (`oras.client.OrasClient`) and
prints one JSON object on stdout. oras-py's own log goes to stderr.

Every command talks plain HTTP to the registry named in the reference.
Credentials, when set, come from TROW_ORAS_USER and TROW_ORAS_PASSWORD and
go to the auth backend TROW_ORAS_AUTH names: "token" (oras-py's default:
the Docker token flow, asking the realm of the registry's Bearer challenge
for a token) or "basic" (Basic credentials on each challenged request).
(oras-py also reads ~/.docker/config.json; it writes nothing there.)

Commands:
  version
  push REF --dir DIR [--file NAME[:MEDIATYPE]]... [--config NAME:MEDIATYPE]
           [--annotation KEY=VALUE]... [--chunked BYTES] [--subject REF]
      Pushes the files (paths relative to DIR; a directory is pushed as a
      tar+gzip layer) with the given config and manifest annotations.
      --subject REF: the manifest that REF names becomes the subject.
      Prints the status, Docker-Content-Digest, Location and OCI-Subject
      of the answer to the manifest PUT, and the subject descriptor sent.
  pull REF OUTDIR
      Pulls every layer into OUTDIR; prints {"files": [paths]}.
  tags REF
      Prints {"tags": [...]}.
  delete REF TAG
      Deletes the manifest TAG names (HEAD, then DELETE by digest).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys

import oras.client
import oras.container
import oras.defaults
import oras.oci
import oras.provider
import oras.version

# oras-py retries a request that raised (a refused login, a 500) after
# sleeping 3, 5, 11, 29 and 83 s (decorator.retry on Registry.do_request).
# These tests want the registry's first answer, and a failure within seconds
# with its traceback rather than at the test's time limit: call the method
# undecorated.
oras.provider.Registry.do_request = oras.provider.Registry.do_request.__wrapped__


def client_for(ref):
    registry = oras.container.Container(ref).registry
    backend = os.environ.get("TROW_ORAS_AUTH", "token")
    client = oras.client.OrasClient(
        hostname=registry, insecure=True, auth_backend=backend
    )
    user = os.environ.get("TROW_ORAS_USER")
    if user:
        client.auth.set_basic_auth(user, os.environ.get("TROW_ORAS_PASSWORD", ""))
    return client


def resolve_subject(client, ref):
    """The descriptor of the manifest REF names, from the bytes the registry
    serves. (oras.oci.Subject.from_manifest re-serialises a parsed manifest
    with json.dumps, which gives another digest for any manifest not written
    by json.dumps with its default separators, so it is not used.)"""
    container = client.get_container(ref)
    accept = ", ".join(oras.defaults.default_manifest_accepted_media_types)
    r = client.do_request(
        f"{client.prefix}://{container.manifest_url()}",
        "GET",
        headers={"Accept": accept},
    )
    if r.status_code != 200:
        raise SystemExit(f"GET subject {ref}: {r.status_code} {r.text}")
    body = r.content
    media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
    return oras.oci.Subject(
        mediaType=media_type,
        digest="sha256:" + hashlib.sha256(body).hexdigest(),
        size=len(body),
    )


def cmd_push(args):
    client = client_for(args.ref)
    subject = resolve_subject(client, args.subject) if args.subject else None
    annotations = {}
    for a in args.annotation:
        key, _, value = a.partition("=")
        annotations[key] = value
    os.chdir(args.dir)
    kwargs = {}
    if args.chunked:
        kwargs = {"do_chunked": True, "chunk_size": args.chunked}
    r = client.push(
        target=args.ref,
        files=args.file,
        manifest_config=args.config,
        manifest_annotations=annotations or None,
        subject=subject,
        quiet=True,
        **kwargs,
    )
    return {
        "status": r.status_code,
        "digest": r.headers.get("Docker-Content-Digest"),
        "location": r.headers.get("Location"),
        "oci_subject": r.headers.get("OCI-Subject"),
        "subject": dataclasses.asdict(subject) if subject else None,
    }


def cmd_pull(args):
    client = client_for(args.ref)
    os.makedirs(args.outdir, exist_ok=True)
    files = client.pull(target=args.ref, outdir=args.outdir)
    return {"files": sorted(files)}


def cmd_tags(args):
    client = client_for(args.ref)
    return {"tags": client.get_tags(args.ref)}


def cmd_delete(args):
    client = client_for(args.ref)
    return {"deleted": client.delete_tags(args.ref, args.tag)}


def main():
    p = argparse.ArgumentParser(description="oras-py driver for Trow's tests")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("version")
    push = sub.add_parser("push")
    push.add_argument("ref")
    push.add_argument("--dir", required=True)
    push.add_argument("--file", action="append", default=[])
    push.add_argument("--config")
    push.add_argument("--annotation", action="append", default=[])
    push.add_argument("--chunked", type=int, default=0)
    push.add_argument("--subject")
    pull = sub.add_parser("pull")
    pull.add_argument("ref")
    pull.add_argument("outdir")
    tags = sub.add_parser("tags")
    tags.add_argument("ref")
    delete = sub.add_parser("delete")
    delete.add_argument("ref")
    delete.add_argument("tag")
    args = p.parse_args()

    if args.command == "version":
        out = {"oras": oras.version.__version__, "python": sys.version.split()[0]}
    else:
        out = globals()["cmd_" + args.command](args)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
