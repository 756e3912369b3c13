#!/usr/bin/env python3
"""The performance issue's target cases, side by side, in rounds.

Runs the cases the targets name (push-mono and push-chunked of 512 MiB, 4 KiB blob pushes and manifest pushes at 16
clients, manifest GET at 64, pulls of 100 MiB at 8 clients, pulls of 1 MiB
at 1000 connections) against each server in turn, each on a fresh data
directory, alternating the order every round so that no server always runs
on a warm or a cold machine. Servers: any number of Trow binaries
(`--trow NAME=PATH`) and CNCF Distribution (`docker-registry`, unless
`--no-distribution`).

    bench/targets.py --bench target/x86_64-unknown-linux-gnu/release/trow-bench \\
        --trow before=/tmp/trow-before --trow after=/tmp/trow-after --rounds 3

The two push cases run interleaved, in slices of two pushes, alternating
which goes first (see `run_pushes`). The push ceiling (the smaller of
SHA-256 on one core and synced writes to the data directory's file system)
moves between rounds by as much as a push does, so it is measured beside
each server's pushes (before, halfway and after) and each push case is read
against the mean of the three.

Writes every JSON line to <out>/<server>-r<round>.jsonl (the ceilings to
<out>/ceilings-<server>-r<round>.jsonl) and prints the targets with their
figure in each round, then a markdown table per case: one column per round,
one row per server.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# The push cases run as this many slices each, interleaved (see
# `run_pushes`); PUSHES_PER_SLICE pushes per slice make eight per case and
# round: one push of 512 MiB is a single sample of a second or so, and with
# three the ratio of chunked to monolithic moved by 0.84-1.16 between rounds
# of the same binary.
PUSH_SLICES = 4
PUSHES_PER_SLICE = "2"

CASES = [
    ("push-mono 512MiB", ["--workload", "push-mono", "--sizes", "512MiB",
                          "--requests", PUSHES_PER_SLICE]),
    ("push-chunked 512MiB", ["--workload", "push-chunked", "--sizes", "512MiB",
                             "--requests", PUSHES_PER_SLICE]),
    ("small-blobs c=16", ["--workload", "small-blobs", "--duration", "5"]),
    ("manifests-push c=16", ["--workload", "manifests-push", "--duration", "5"]),
    ("manifest-get c=64", ["--workload", "manifest-get", "--duration", "5"]),
    ("pull 100MiB c=8", ["--workload", "pull", "--pull-sizes", "100MiB",
                         "--concurrency", "8", "--duration", "5"]),
    ("pull 1MiB c=1000", ["--workload", "pull", "--pull-sizes", "1MiB",
                          "--concurrency", "1000", "--duration", "5"]),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, log):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"server exited during start-up; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit(f"server did not answer GET /v2/ in 60 s; see {log}")


def start(name, binary, work):
    data = os.path.join(work, f"{name}-data")
    os.makedirs(data)
    port = free_port()
    log = os.path.join(work, f"{name}.log")
    if binary is None:
        config = os.path.join(work, "dist.yml")
        with open(config, "w") as f:
            f.write(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""")
        cmd = [shutil.which("docker-registry") or "/usr/bin/docker-registry", "serve", config]
        env = dict(os.environ)
    else:
        cmd = [binary, "--bind", f"127.0.0.1:{port}", "--data-dir", data]
        env = dict(os.environ, TROW_LOG_LEVEL="error")
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    wait_ready(proc, port, log)
    time.sleep(1)
    return proc, port


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def push_ceiling(bench, work, out, name, rnd):
    """Measures the machine's ceilings now, in the server's directory's file
    system, appends them to <out>/ceilings-<server>-r<round>.jsonl and
    returns the push ceiling (the smaller of SHA-256 and synced writes)."""
    c = subprocess.run([bench, "ceilings", "--dir", work, "--json"],
                       capture_output=True, text=True)
    with open(os.path.join(out, f"ceilings-{name}-r{rnd + 1}.jsonl"), "a") as f:
        f.write(c.stdout)
    for line in c.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("case") == "push-ceiling":
                return row["mib_per_s"]
    sys.exit(f"trow-bench ceilings gave no push-ceiling: {c.stderr[-500:]}")


def run_pushes(pushes, run, bench, work, out, name, rnd):
    """Runs the push cases in PUSH_SLICES interleaved slices, alternating
    which case goes first, with the push ceiling measured before, halfway
    and after; yields (case, row) with each case's slices combined and read
    against the mean of the ceilings.

    Why interleaved: writing into memory the machine has not touched for a
    while costs several times more than into memory freed moments ago (a
    virtual machine whose free pages go back to the host), so the second
    case of a server ran slower whatever it was (4 GiB of monolithic pushes
    after 4 GiB of chunked ones: 3.7 s/GiB instead of 2.2-2.5). Slices
    give both cases the same share of each state."""
    ceilings = [push_ceiling(bench, work, out, name, rnd)]
    slices = {case: [] for case, _ in pushes}
    for k in range(PUSH_SLICES):
        for case, extra in (pushes if k % 2 == 0 else list(reversed(pushes))):
            slices[case].extend(run(case, extra))
        if k + 1 in (PUSH_SLICES // 2, PUSH_SLICES):
            ceilings.append(push_ceiling(bench, work, out, name, rnd))
    for case, _ in pushes:
        rows = slices[case]
        if not rows:
            continue
        total = sum(r["bytes"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        cpu = [r.get("server_cpu_s") for r in rows]
        row = dict(rows[0])
        row.update({
            "ops": sum(r["ops"] for r in rows),
            "bytes": total,
            "seconds": seconds,
            "mib_per_s": total / seconds / 2**20 if seconds else None,
            "errors": sum(r.get("errors") or 0 for r in rows),
            "server_cpu_s": sum(cpu) if None not in cpu else None,
            "server_cpu_s_per_gib": sum(cpu) / (total / 2**30) if None not in cpu and total else None,
            "server_peak_rss_mib": max(r.get("server_peak_rss_mib") or 0 for r in rows),
            "slices_mib_per_s": [r["mib_per_s"] for r in rows],
            "ceiling_beside": sum(ceilings) / len(ceilings),
            "ceilings": ceilings,
        })
        yield case, row


def ratio(field):
    """A target's figure: the subject's `field` over the other row's."""
    return lambda s, o: s[field] / o[field]


def own(field):
    """A target's figure: the subject's `field` as it is."""
    return lambda s, o: s[field]


# The targets: (what, case, row compared with, figure, test). The
# row compared with is Distribution's or Trow 0.10's ("previous") in the
# same case, the subject's own in another case, or none; the figure gets
# the subject's row and that row.
TARGETS = [
    ("monolithic push >= 0.75 x ceiling beside it", "push-mono 512MiB", None,
     lambda s, o: s["mib_per_s"] / s["ceiling_beside"], lambda v: v >= 0.75),
    ("chunked push >= 0.9 x our monolithic", "push-chunked 512MiB", "push-mono 512MiB",
     ratio("mib_per_s"), lambda v: v >= 0.9),
    ("4 KiB blob pushes >= 8 x Distribution", "small-blobs c=16", "distribution",
     ratio("ops_per_s"), lambda v: v >= 8),
    ("manifest pushes >= 5 x Distribution", "manifests-push c=16", "distribution",
     ratio("ops_per_s"), lambda v: v >= 5),
    ("manifest pushes >= 1.5 x Trow 0.10", "manifests-push c=16", "previous",
     ratio("ops_per_s"), lambda v: v >= 1.5),
    ("manifest GET >= 7.5 x Distribution", "manifest-get c=64", "distribution",
     ratio("ops_per_s"), lambda v: v >= 7.5),
    ("manifest GET p99 <= 0.1 x Distribution's", "manifest-get c=64", "distribution",
     ratio("p99_ms"), lambda v: v <= 0.1),
    ("pull 100 MiB >= Distribution", "pull 100MiB c=8", "distribution",
     ratio("mib_per_s"), lambda v: v >= 1),
    ("pull 100 MiB <= 0.25 s/GiB", "pull 100MiB c=8", None,
     own("server_cpu_s_per_gib"), lambda v: v <= 0.25),
    ("1000 connections: no errors", "pull 1MiB c=1000", None,
     own("errors"), lambda v: v == 0),
    ("1000 connections: peak RSS <= 64 MiB", "pull 1MiB c=1000", None,
     own("server_peak_rss_mib"), lambda v: v <= 64),
]


def print_targets(results, servers, args):
    """One line per target with its figure in each round and whether it held
    in every round, for the subject (the first --trow unless --subject)."""
    names = [n for n, _ in servers]
    subject = args.subject or (names[0] if names else None)
    previous = args.previous if args.previous in names else None
    print(f"## Targets ({subject})\n")
    print("| target | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | met |")
    print("|---|" + "---|" * (args.rounds + 1))
    rows = list(TARGETS) + [("peak RSS without c=1000 <= 24 MiB", "peak RSS", None,
                            own("peak_small"), lambda v: v <= 24)]
    for what, case, other, figure, holds in rows:
        mine = results.get((case, subject), [])
        if other == "distribution":
            theirs = results.get((case, "distribution"), [])
        elif other == "previous":
            theirs = results.get((case, previous), []) if previous else []
        elif other is not None:
            theirs = results.get((other, subject), [])
        else:
            theirs = mine
        if not mine or not theirs:
            continue
        cells, met = [], True
        for s, o in zip(mine, theirs):
            try:
                v = figure(s, o)
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
                met = False
                continue
            ok = holds(v)
            met = met and ok
            cells.append(f"{v:.2f}" + ("" if ok else " (short)"))
        print(f"| {what} | " + " | ".join(cells) + f" | {'yes' if met else 'no'} |")
    print()


def headline(row):
    if row.get("workload") in ("small-blobs", "manifests-push", "manifest-get", "manifest-head"):
        return row.get("ops_per_s")
    return row.get("mib_per_s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="trow-bench binary")
    ap.add_argument("--trow", action="append", default=[], help="NAME=PATH of a Trow binary")
    ap.add_argument("--no-distribution", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="", help="comma-separated case names to run (default all)")
    ap.add_argument("--subject", default=None,
                    help="server whose targets are checked (default the first --trow)")
    ap.add_argument("--previous", default="trow010",
                    help="the Trow 0.10 server's name, for the manifest-push target")
    ap.add_argument("--out", default=None, help="directory for the JSON lines")
    args = ap.parse_args()

    servers = [(n, p) for n, p in (t.split("=", 1) for t in args.trow)]
    if not args.no_distribution:
        servers.append(("distribution", None))
    cases = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    out = args.out or tempfile.mkdtemp(prefix="trow-targets-")
    os.makedirs(out, exist_ok=True)
    results = {}  # (case, server) -> [row per round]
    labels = []  # table names in the order first seen
    for rnd in range(args.rounds):
        order = servers if rnd % 2 == 0 else list(reversed(servers))
        for name, binary in order:
            work = tempfile.mkdtemp(prefix=f"targets-{name}-", dir="/tmp")
            try:
                proc, port = start(name, binary, work)
                idle = rss_mib(proc.pid, "VmRSS")
                jsonl = os.path.join(out, f"{name}-r{rnd + 1}.jsonl")
                peak = 0.0
                # The RSS target leaves out the 1000-connection case.
                peak_small = 0.0

                def run(case, extra):
                    cmd = [args.bench, "run", "--url", f"http://127.0.0.1:{port}", "--json",
                           "--server-pid", str(proc.pid)] + extra
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    with open(jsonl, "a") as f:
                        f.write(r.stdout)
                    if r.returncode != 0:
                        print(f"{name} {case}: trow-bench exited {r.returncode}: {r.stderr[-500:]}",
                              file=sys.stderr)
                    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]

                def record(case, rows):
                    nonlocal peak, peak_small
                    for row in rows:
                        peak = max(peak, row.get("server_peak_rss_mib") or 0)
                        if "c=1000" not in case:
                            peak_small = max(peak_small, row.get("server_peak_rss_mib") or 0)
                        # A case can yield rows of two workloads
                        # (manifest-get also times HEAD): one table each.
                        label = case
                        if row.get("workload") != rows[0].get("workload"):
                            label = f"{case}: {row.get('workload')}"
                        if label not in labels:
                            labels.append(label)
                        results.setdefault((label, name), []).append(row)

                pushes = [c for c in cases if c[0].startswith("push-")]
                if pushes:
                    for case, row in run_pushes(pushes, run, args.bench, work, out, name, rnd):
                        record(case, [row])
                for case, extra in cases:
                    if not case.startswith("push-"):
                        record(case, run(case, extra))
                results.setdefault(("peak RSS", name), []).append(
                    {"peak": peak, "peak_small": peak_small, "idle": idle})
                stop(proc)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"round {rnd + 1}: {name} done", file=sys.stderr)

    print(f"JSON lines in {out}\n")
    print_targets(results, servers, args)
    for case in labels + ["peak RSS"]:
        print(f"## {case}\n")
        print("| server | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
        print("|---|" + "---|" * args.rounds)
        for name, _ in servers:
            cells = []
            for row in results.get((case, name), []):
                if case == "peak RSS":
                    cells.append(f"{row['peak']:.1f} MiB, {row['peak_small']:.1f} MiB without "
                                 f"c=1000 (idle {row['idle']:.1f})")
                    continue
                v = headline(row)
                cell = f"{v:.0f}" if v is not None else "-"
                if row.get("server_cpu_s_per_gib") is not None:
                    cell += f", {row['server_cpu_s_per_gib']:.2f} s/GiB"
                elif row.get("server_cpu_ms_per_op") is not None:
                    cell += f", {row['server_cpu_ms_per_op']:.2f} ms/op"
                if row.get("p99_ms") is not None and ("get" in case or "head" in case):
                    cell += f", p99 {row['p99_ms']:.1f} ms"
                if row.get("ceiling_beside"):
                    cell += (f", {v / row['ceiling_beside']:.2f} x ceiling "
                             f"{row['ceiling_beside']:.0f}")
                if row.get("errors"):
                    cell += f", {row['errors']} errors"
                cell += f", peak {row.get('server_peak_rss_mib') or 0:.1f} MiB"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
