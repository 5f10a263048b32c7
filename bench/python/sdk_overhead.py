#!/usr/bin/env python3
"""Python SDK overhead: `Sandbox.create` + `exec("true")` + `destroy` timed
from Python, next to the same three steps through the `somna` CLI, against a
throwaway `somna up` (real microVMs). Prints one JSON summary.

    python3 bench/python/sdk_overhead.py [--iterations N] [--image busybox]

Needs the Python SDK installed (`pip install ./sdk/python`), the release
build (`target/release/somna`, or $SOMNA_BIN) and the guest artifacts
(`scripts/setup.sh build`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "sdk" / "python" / "tests"))

import somna  # noqa: E402
from somna_platform import Platform  # noqa: E402


def percentile(samples: List[float], q: float) -> float:
    s = sorted(samples)
    k = max(0, min(len(s) - 1, round(q * (len(s) - 1))))
    return s[k]


def summary(samples: List[float]) -> Dict[str, float]:
    return {
        "count": len(samples),
        "p50_ms": round(percentile(samples, 0.5), 2),
        "p99_ms": round(percentile(samples, 0.99), 2),
        "mean_ms": round(statistics.fmean(samples), 2),
        "min_ms": round(min(samples), 2),
        "max_ms": round(max(samples), 2),
    }


def sdk_round(client: "somna.Client", image: str, phases: Dict[str, List[float]]) -> float:
    t0 = time.perf_counter()
    sbx = somna.Sandbox.create(image=image, client=client)
    t1 = time.perf_counter()
    r = sbx.exec("true")
    t2 = time.perf_counter()
    sbx.destroy()
    t3 = time.perf_counter()
    assert r.exit_code == 0, r
    phases["create"].append((t1 - t0) * 1e3)
    phases["exec"].append((t2 - t1) * 1e3)
    phases["destroy"].append((t3 - t2) * 1e3)
    return (t3 - t0) * 1e3


def cli_round(p: Platform, image: str, phases: Dict[str, List[float]]) -> float:
    env = p.env()
    cli = str(p.binary)

    def run(*args: str) -> str:
        out = subprocess.run([cli, *args], env=env, check=True, capture_output=True, text=True)
        return out.stdout

    t0 = time.perf_counter()
    sid = run("sandbox", "create", "--image", image).strip()
    t1 = time.perf_counter()
    run("sandbox", "exec", sid, "--", "true")
    t2 = time.perf_counter()
    run("sandbox", "rm", sid)
    t3 = time.perf_counter()
    phases["create"].append((t1 - t0) * 1e3)
    phases["exec"].append((t2 - t1) * 1e3)
    phases["destroy"].append((t3 - t2) * 1e3)
    return (t3 - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--image", default="busybox")
    args = ap.parse_args()

    with Platform() as p:
        client = somna.Client(p.addr, api_key=p.api_key)
        results = {}
        # Interleave SDK and CLI rounds so drift on the host hits both alike.
        totals: Dict[str, List[float]] = {"sdk": [], "cli": []}
        phases: Dict[str, Dict[str, List[float]]] = {
            k: {"create": [], "exec": [], "destroy": []} for k in totals
        }
        for i in range(args.warmup + args.iterations):
            scratch = {k: {"create": [], "exec": [], "destroy": []} for k in totals}
            sdk = sdk_round(client, args.image, scratch["sdk"])
            cli = cli_round(p, args.image, scratch["cli"])
            if i < args.warmup:
                continue
            totals["sdk"].append(sdk)
            totals["cli"].append(cli)
            for k in totals:
                for ph, v in scratch[k].items():
                    phases[k][ph].extend(v)
        for k in totals:
            results[k] = {"total": summary(totals[k]),
                          **{ph: summary(v) for ph, v in phases[k].items()}}
        client.close()
        print(json.dumps({
            "benchmark": "python-sdk-vs-cli: create + exec(true) + destroy",
            "image": args.image,
            "iterations": args.iterations,
            "accelerator": p.accelerator,
            "python": sys.version.split()[0],
            "sdk": results["sdk"],
            "cli": results["cli"],
            "sdk_minus_cli_p50_ms": round(results["sdk"]["total"]["p50_ms"] - results["cli"]["total"]["p50_ms"], 2),
        }, indent=2))


if __name__ == "__main__":
    main()
