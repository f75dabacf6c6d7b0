"""Token-budget batching against batches of requests: the same text model served by several `kiln serve`
configurations side by side (idle but for the one under load), the same `kiln loadtest` client against each, in
interleaved rounds, on the short workload and on the retrieval mix.

    python benchmarks/token_batching.py ARTIFACT_DIR --variant pt2-int8 --rounds 3 \\
        --config rows="--max-batch-tokens 0" --config budget=""

Prints one line per (round, config, workload, concurrency) and a table of medians with their ranges, then the
targets of issue #20 as ratios within this run: each config's real tokens/s on the mix over its own (and the
first config's) short-workload tokens/s, and req/s and p50 over the first config's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

FIELDS = ("requests_per_s", "p50_ms", "p99_ms", "tokens_per_s", "padding_waste", "mean_batch_items", "error_count")


def loadtest(url: str, mix: str, levels: str, duration: float, share: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "kiln", "loadtest", url, "--mix", mix, "--concurrency", levels,
                   "--duration", str(duration), "--out", out]
        if mix == "retrieval":
            command += ["--passage-share", str(share)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "loadtest.json").read_text())["levels"]


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--variant", default="pt2-int8")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--max-batch-size", default="32")
    parser.add_argument("--config", action="append", required=True,
                        help='NAME="kiln serve options" (repeat; the first is the baseline); leading VAR=value '
                             'words go to the server\'s environment')
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--passage-share", type=float, default=0.25)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()

    configs = [(c.split("=", 1)[0], shlex.split(c.split("=", 1)[1] if "=" in c else "")) for c in args.config]
    servers = {}
    figures: dict[tuple[str, str, int], dict[str, list]] = {}
    try:
        for name, options in configs:
            env = dict(o.split("=", 1) for o in options if "=" in o and o.split("=", 1)[0].isupper())
            options = [o for o in options if o.split("=", 1)[0] not in env]
            servers[name] = ServerProcess(args.artifacts, "--variant", args.variant, "--threads", args.threads,
                                          "--max-batch-size", args.max_batch_size, *options,
                                          env=env).wait_ready(300)
        for round_ in range(args.rounds):
            for mix in ("short", "retrieval"):
                for name, _ in configs:
                    for level in loadtest(servers[name].url, mix, args.concurrency, args.duration,
                                          args.passage_share):
                        cell = figures.setdefault((name, mix, level["concurrency"]), {f: [] for f in FIELDS})
                        for field in FIELDS:
                            cell[field].append(level.get(field))
                        print(f"round {round_ + 1} {name:>10} {mix:>9} c{level['concurrency']:<3} "
                              + " ".join(f"{f} {level.get(f) if level.get(f) is None else round(level[f], 2)}"
                                         for f in FIELDS), flush=True)
    finally:
        for server in servers.values():
            server.stop()

    print("\nmedian (range) over rounds")
    print("| config | workload | c | req/s | p50 ms | p99 ms | real tokens/s | padding waste | items/batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, mix, level), cell in figures.items():
        print(f"| {name} | {mix} | {level} | " + " | ".join(spread(cell[f]) for f in FIELDS[:-1]) + " |")
    base = configs[0][0]
    med = {key: {f: statistics.median([v for v in cell[f] if v is not None] or [0.0]) for f in FIELDS}
           for key, cell in figures.items()}
    top = max(int(c) for c in args.concurrency.split(","))
    print(f"\nratios (medians; baseline {base})")
    for name, _ in configs:
        mix, short = med.get((name, "retrieval", top)), med.get((name, "short", top))
        if not mix or not short:
            continue
        line = (f"{name}: c{top} mix tokens/s / own short tokens/s {mix['tokens_per_s'] / short['tokens_per_s']:.2f}"
                f", / {base} short {mix['tokens_per_s'] / med[(base, 'short', top)]['tokens_per_s']:.2f}; "
                f"mix req/s x{mix['requests_per_s'] / med[(base, 'retrieval', top)]['requests_per_s']:.2f}, "
                f"short req/s x{short['requests_per_s'] / med[(base, 'short', top)]['requests_per_s']:.2f}, "
                f"short p50 x{short['p50_ms'] / med[(base, 'short', top)]['p50_ms']:.2f}")
        for level in sorted({k[2] for k in med} - {top}):
            for workload in ("short", "retrieval"):
                if (name, workload, level) in med:
                    line += (f"; c{level} {workload} p50 x"
                             f"{med[(name, workload, level)]['p50_ms'] / med[(base, workload, level)]['p50_ms']:.2f}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}|{k[1]}|{k[2]}": v for k, v in figures.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
