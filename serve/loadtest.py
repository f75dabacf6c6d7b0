"""`kiln loadtest`: a bounded concurrency sweep against a running server, with an in-process ceiling.

Each level runs N async clients that send one-item requests (V2 or /predict) until the request
count or the time bound is reached. With `--ceiling ARTIFACT_DIR` the same variant is then run
in-process at the batch sizes the server actually formed (read off its /metrics), so the report
says what fraction of the model's own speed the server delivers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from kiln.models.errors import UsageError

EXAMPLE = """examples:
  kiln loadtest http://127.0.0.1:8000 --concurrency 1,8,32 --requests 2000
  kiln loadtest http://127.0.0.1:8000 --protocol predict --duration 20 --ceiling artifacts/minilm --threads 2
"""


def add_loadtest_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "loadtest", help="concurrency sweep against a running kiln server",
        description="Send real requests at several concurrency levels and report latency, throughput, errors.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per level (default 1000)")
    parser.add_argument("--duration", type=float, help="seconds per level (then --requests is an upper bound)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="hard time bound per level")
    parser.add_argument("--protocol", choices=("v2", "predict"), default="v2")
    parser.add_argument("--model", help="model name (default: the one the server reports)")
    parser.add_argument("--ceiling", metavar="ARTIFACT_DIR", help="also measure the served variant in-process")
    parser.add_argument("--variant", help="variant for --ceiling (default: the manifest's default)")
    parser.add_argument("--threads", type=int, help="runtime threads for --ceiling (match the server's)")
    parser.add_argument("--api-key-env", help="environment variable holding the server's API key")
    parser.add_argument("--out", default="loadtest", help="folder for loadtest.json and loadtest.png")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.set_defaults(handler=run_loadtest_command)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(level < 1 or level > 1024 for level in levels):
        raise UsageError(f"--concurrency {text!r} must be positive integers up to 1024, e.g. 1,8,32")
    return levels


def sample_items(model: dict, count: int = 64) -> list:
    """One-item inputs: real sentences for text models, real-looking random tensors otherwise."""
    if model["inputs"][0]["datatype"] == "BYTES":
        from kiln.models.minilm import sentences

        texts = sentences()
        return [texts[i % len(texts)] for i in range(count)]
    rng = np.random.default_rng(0)
    items = []
    for _ in range(count):
        item = {}
        for spec in model["inputs"]:
            shape = [1 if d == -1 else d for d in spec["shape"]]
            if spec["datatype"].startswith("FP"):
                item[spec["name"]] = (rng.random(shape) * 16).astype(np.float32)
            else:
                item[spec["name"]] = rng.integers(0, 100, shape)
        items.append(item)
    return items


def request_body(protocol: str, model: dict, item) -> tuple[str, dict]:
    name = model["name"]
    if isinstance(item, str):
        if protocol == "predict":
            return "/predict", {"text": item}
        return f"/v2/models/{name}/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                         "data": [item]}]}
    if protocol == "predict":
        return "/predict", {"inputs": {k: v.tolist() for k, v in item.items()}}
    tensors = [{"name": spec["name"], "shape": list(item[spec["name"]].shape), "datatype": spec["datatype"],
                "data": item[spec["name"]].reshape(-1).tolist()} for spec in model["inputs"]]
    return f"/v2/models/{name}/infer", {"inputs": tensors}


class _Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    A general client (httpx) spent a whole core at ~150 requests/s here, so it measured itself, not the server.
    This one sends pre-encoded requests and reads Content-Length framed answers: tens of microseconds each.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, raw: bytes, timeout: float) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> int:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length, close, chunked = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def encode_requests(url: str, bodies: list, headers: dict) -> list[bytes]:
    """Each (path, json body) as the exact bytes of an HTTP/1.1 POST, encoded once before the clock starts."""
    from urllib.parse import urlsplit

    host = urlsplit(url).netloc
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    encoded = []
    for path, body in bodies:
        payload = json.dumps(body).encode()
        encoded.append(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
    return encoded


async def run_level(url: str, concurrency: int, bodies: list, requests: int, duration: float | None,
                    max_seconds: float, timeout: float, headers: dict) -> dict:
    """`concurrency` connections, each sending its next request when the last one is answered."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    raw = encode_requests(url, bodies, headers)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    start = time.perf_counter()
    stop_at = start + min(duration or max_seconds, max_seconds)

    async def worker(index: int) -> None:
        nonlocal sent
        connection = _Connection(parts.hostname, parts.port or 80)
        try:
            while sent < requests and time.perf_counter() < stop_at:
                body = raw[(sent + index) % len(raw)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    status = await connection.request(body, timeout)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    connection.close()
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency, "requests": sent, "ok": len(latencies), "errors": errors,
        "error_count": sum(errors.values()), "seconds": round(elapsed, 3),
        "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)), "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
    }


def scrape(url: str, headers: dict) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    values = {}
    for name in ("kiln_batch_items_sum", "kiln_batch_items_count"):
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values


def ceiling(artifact_dir: str, variant: str | None, threads: int | None, items: list, batch_size: int,
            seconds: float = 3.0) -> dict:
    """In-process throughput and latency of the runtime at one batch size, on the same items."""
    from kiln.export.manifest import read_manifest
    from kiln.export.runtime import load

    runtime = load(artifact_dir, variant, threads)
    manifest = read_manifest(artifact_dir)
    batch = [items[i % len(items)] for i in range(batch_size)]
    if isinstance(batch[0], str):
        from tokenizers import Tokenizer

        pre = manifest.preprocessing
        tokenizer = Tokenizer.from_file(str(Path(artifact_dir) / pre["tokenizer"]))
        tokenizer.enable_truncation(int(pre.get("max_length", 128)))
        tokenizer.enable_padding()

        def prepare():  # the server tokenizes per batch, so the ceiling pays for it too
            encoded = tokenizer.encode_batch(batch)
            return {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}
    else:
        stacked = {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}

        def prepare():
            return stacked
    for _ in range(3):
        runtime.run(prepare())
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        runtime.run(prepare())
        times.append(time.perf_counter() - t0)
    p50 = float(np.median(times))
    return {"batch_size": batch_size, "p50_ms": p50 * 1000, "items_per_s": batch_size / p50}


def run_loadtest_command(args) -> int:
    import httpx

    levels = parse_levels(args.concurrency)
    if args.requests < 1:
        raise UsageError("--requests must be a positive integer")
    url = args.url.rstrip("/")
    headers = {}
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UsageError(f"--api-key-env {args.api_key_env!r} is unset or empty; export the key there")
        headers["Authorization"] = f"Bearer {key}"
    try:
        server = httpx.get(f"{url}/v2", headers=headers, timeout=10)
        ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach {url} ({exc}); start it with `kiln serve` and check the URL") from exc
    if server.status_code != 200 or ready.status_code != 200:
        raise UsageError(f"{url} is not a ready kiln/V2 server (HTTP {server.status_code}/{ready.status_code})")
    name = args.model or (server.json().get("models") or [None])[0]
    if not name:
        raise UsageError("the server does not say its model name; pass --model NAME")
    model = httpx.get(f"{url}/v2/models/{name}", headers=headers, timeout=10).json()
    items = sample_items(model)
    bodies = [request_body(args.protocol, model, item) for item in items]
    results = []
    for level in levels:
        before = scrape(url, headers)
        result = asyncio.run(run_level(url, level, bodies, args.requests, args.duration, args.max_seconds,
                                       args.timeout, headers))
        after = scrape(url, headers)
        batches = after["kiln_batch_items_count"] - before["kiln_batch_items_count"]
        result["mean_batch_items"] = (after["kiln_batch_items_sum"] - before["kiln_batch_items_sum"]) / batches \
            if batches else None
        results.append(result)
        print(f"[kiln] concurrency {level}: {result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
              f"errors {result['error_count']}", file=sys.stderr, flush=True)
    if args.ceiling:
        ceilings: dict[int, dict] = {}
        for result in results:
            size = max(1, round(result["mean_batch_items"] or 1))
            if size not in ceilings:
                ceilings[size] = ceiling(args.ceiling, args.variant, args.threads, items, size)
            result["ceiling"] = ceilings[size]
            result["fraction_of_ceiling"] = result["requests_per_s"] / ceilings[size]["items_per_s"]
            result["p50_minus_in_process_ms"] = result["p50_ms"] - ceilings[size]["p50_ms"]
    report = {"url": url, "model": name, "protocol": args.protocol, "levels": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "loadtest.png", name)
    print_table(results)
    print(f"wrote {out / 'loadtest.json'} and {out / 'loadtest.png'}")
    return 0


def print_table(results: list[dict]) -> None:
    header = ["concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "mean batch", "ceiling/s", "fraction"]
    rows = [header]
    for r in results:
        c = r.get("ceiling")
        rows.append([str(r["concurrency"]), f"{r['requests_per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", str(r["error_count"]),
                     f"{r['mean_batch_items']:.1f}" if r.get("mean_batch_items") else "-",
                     f"{c['items_per_s']:.0f}" if c else "-",
                     f"{r['fraction_of_ceiling']:.2f}" if c else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


def plot(results: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [r["requests_per_s"] for r in results], "o-", label="server")
    if all("ceiling" in r for r in results):
        left.plot(levels, [r["ceiling"]["items_per_s"] for r in results], "s--", label="in-process ceiling")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrency")
    left.set_ylabel("requests/s")
    left.legend()
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        right.plot(levels, [r[key] for r in results], "o-", label=key.replace("_ms", ""))
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrency")
    right.set_ylabel("latency (ms)")
    right.legend()
    fig.suptitle(f"kiln loadtest: {name}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
