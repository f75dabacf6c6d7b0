"""`kiln loadtest`: a bounded concurrency sweep against a running server, with an in-process ceiling.

Each level runs N async clients that send requests of `--items` items each (V2 JSON, V2 with the binary tensor
extension, or /predict) until the request count or the time bound is reached; throughput is reported in requests
and in items per second. With `--ceiling ARTIFACT_DIR` the same variant is also run
in-process (kiln.bench.ceiling), right after each round of load, at the batch size the server formed in
that round (read off its /metrics), so the report says what fraction of the model's own speed the
server delivers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from kiln.core.console import format_table
from kiln.core.errors import UsageError
from kiln.core.manifest import write_json_atomic
from kiln.core.secrets import api_key_from_env
from kiln.core.v2_wire import tensor_bytes
from kiln.models.text_data import builtin_texts, sentences


def read_texts(path: str) -> list[str]:
    try:
        texts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--texts {path!r} cannot be read ({exc}); give a UTF-8 file, one text a line") from exc
    if not texts:
        raise UsageError(f"--texts {path!r} holds no text; give one text a line")
    return texts


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(level < 1 or level > 1024 for level in levels):
        raise UsageError(f"--concurrency {text!r} must be positive integers up to 1024, e.g. 1,8,32")
    return levels


def sample_items(model: dict, count: int = 64, texts_file: str | None = None) -> list:
    """One-item inputs: texts for text models (`--texts FILE`, one a line, or kiln's built-in varied set),
    real-looking random tensors otherwise."""
    if model["inputs"][0]["datatype"] == "BYTES":
        texts = read_texts(texts_file) if texts_file else builtin_texts()
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


MIXES = ("short", "retrieval")
PASSAGE_WORDS = (80, 220)  # a retrieval mix's passages: this many words, uniformly
MIX_TEXTS = 256  # texts in a built-in mix: enough that the passage share holds within a request's rounding


def mix_texts(mix: str, passage_share: float = 0.25, count: int = MIX_TEXTS, seed: int = 0) -> list[str]:
    """A built-in text workload from the sentences kiln ships (models/data/sentences.txt, 40-70 characters each):
    "short" is those sentences; "retrieval" is traffic as a retrieval service sees it, queries (the sentences)
    with `passage_share` of the requests a passage of PASSAGE_WORDS words (consecutive sentences joined), in a
    fixed shuffled order. Length-aware batching exists for the second: padded to its longest, every batch would
    compute its queries at passage length."""
    queries = sentences()
    if mix == "short":
        return [queries[i % len(queries)] for i in range(count)]
    if not 0.0 <= passage_share <= 1.0:
        raise UsageError(f"--passage-share {passage_share} must lie in 0..1 (the share of requests that are passages)")
    rng = np.random.default_rng(seed)
    passages = []
    for _ in range(round(count * passage_share)):
        words: list[str] = []
        target = int(rng.integers(PASSAGE_WORDS[0], PASSAGE_WORDS[1] + 1))
        at = int(rng.integers(len(queries)))
        while len(words) < target:
            words += queries[at % len(queries)].split()
            at += 1
        passages.append(" ".join(words[:target]))
    texts = passages + [queries[i % len(queries)] for i in range(count - len(passages))]
    return [texts[i] for i in rng.permutation(len(texts))]


PROTOCOLS = ("v2", "v2-binary", "predict")


def group_items(items: list, per_request: int) -> list:
    """Requests of `per_request` items each, cycling through the one-item samples: texts as lists, tensors stacked
    along the first axis."""
    groups = []
    for start in range(len(items)):
        chosen = [items[(start + i) % len(items)] for i in range(per_request)]
        if isinstance(chosen[0], str):
            groups.append(chosen)
        else:
            groups.append({k: np.concatenate([c[k] for c in chosen]) for k in chosen[0]})
    return groups


def request_body(protocol: str, model: dict, group) -> tuple[str, bytes, dict[str, str]]:
    """One request as (path, body bytes, headers): `group` is a list of texts or a dict of arrays (items first)."""
    path = "/predict" if protocol == "predict" else f"/v2/models/{model['name']}/infer"
    if isinstance(group, str):
        group = [group]
    if isinstance(group, list):
        if protocol == "predict":
            body: dict = {"text": group[0]} if len(group) == 1 else {"texts": group}
            return path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        tensors = [{"name": "text", "shape": [len(group)], "datatype": "BYTES", "data": group}]
        raw = [tensor_bytes("BYTES", group)]
    else:
        if protocol == "predict":
            return path, json.dumps({"inputs": {k: v.tolist() for k, v in group.items()}}).encode(), \
                {"Content-Type": "application/json"}
        tensors = [{"name": spec["name"], "shape": list(group[spec["name"]].shape), "datatype": spec["datatype"],
                    "data": group[spec["name"]].reshape(-1).tolist()} for spec in model["inputs"]]
        raw = [tensor_bytes(spec["datatype"], group[spec["name"]]) for spec in model["inputs"]]
    if protocol == "v2":
        return path, json.dumps({"inputs": tensors}).encode(), {"Content-Type": "application/json"}
    for tensor, data in zip(tensors, raw):  # v2-binary: binary in and out, as tritonclient sends by default
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps({"inputs": tensors, "parameters": {"binary_data_output": True}}).encode()
    return path, header + b"".join(raw), {"Content-Type": "application/octet-stream",
                                          "Inference-Header-Content-Length": str(len(header))}


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


def run_async(coroutine):
    """The client's event loop: uvloop where installed (it comes with uvicorn's standard extras), which halves the
    client's CPU per request; on a 2-core machine that CPU is taken from the server being measured."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def encode_requests(url: str, bodies: list, headers: dict) -> list[bytes]:
    """Each (path, body bytes, its headers) as the exact bytes of an HTTP/1.1 POST, encoded once before the clock
    starts."""
    from urllib.parse import urlsplit

    host = urlsplit(url).netloc
    encoded = []
    for path, payload, own in bodies:
        extra = "".join(f"{k}: {v}\r\n" for k, v in {**own, **headers}.items())
        encoded.append(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                       f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
    return encoded


async def run_level(url: str, concurrency: int, bodies: list, requests: int, duration: float | None,
                    max_seconds: float, timeout: float, headers: dict, sink: list | None = None) -> dict:
    """`concurrency` connections, each sending its next request when the last one is answered. The latencies
    (seconds) of answered requests are also appended to `sink` when one is given."""
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
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
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
    if sink is not None:
        sink.extend(latencies)
    return {
        "concurrency": concurrency, "requests": sent, "ok": len(latencies), "errors": errors,
        "error_count": sum(errors.values()), "seconds": round(elapsed, 3), **latency_figures(latencies),
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
    }


def latency_figures(latencies: list[float]) -> dict:
    """p50/p90/p99 in milliseconds of latencies in seconds (NaN when nothing was answered)."""
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def scrape(url: str, headers: dict, model: str) -> dict[str, float]:
    """The model's batch figures from the server's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    values = {}
    for name in ("kiln_batch_items_sum", "kiln_batch_items_count", "kiln_batch_tokens_real_total",
                 "kiln_batch_tokens_padded_total"):
        match = re.search(rf'^{name}{{model="{re.escape(model)}"}} ([0-9.e+-]+)$', text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values


def run_rounds(url: str, level: int, bodies: list, args, headers: dict, rounds: int, ceiling, model: str) -> dict:
    """One concurrency level in `rounds` rounds; with a ceiling, each round is followed by the in-process run at
    the batch size that round formed, and the ratios are taken round by round (then the median), so slow drift of
    the machine's speed cancels out of them."""
    per_round = max(1, args.requests // rounds)
    duration = args.duration / rounds if args.duration else None
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = sent = 0
    seconds = 0.0
    fractions, deltas, ceilings, batches = [], [], [], []
    real_tokens = padded_tokens = 0.0
    for _ in range(rounds):
        before = scrape(url, headers, model)
        result = run_async(run_level(url, level, bodies, per_round, duration, args.max_seconds / rounds,
                                       args.timeout, headers, latencies))
        after = scrape(url, headers, model)
        count = after["kiln_batch_items_count"] - before["kiln_batch_items_count"]
        batch = (after["kiln_batch_items_sum"] - before["kiln_batch_items_sum"]) / count if count else None
        real_tokens += after["kiln_batch_tokens_real_total"] - before["kiln_batch_tokens_real_total"]
        padded_tokens += after["kiln_batch_tokens_padded_total"] - before["kiln_batch_tokens_padded_total"]
        ok += result["ok"]
        sent += result["requests"]
        seconds += result["seconds"]
        for name, n in result["errors"].items():
            errors[name] = errors.get(name, 0) + n
        if batch is not None:
            batches.append(batch)
        if ceiling is not None and result["ok"]:
            measured = ceiling.measure(max(1, round(batch or 1)))
            ceilings.append(measured)
            fractions.append(result["requests_per_s"] * args.items / measured["items_per_s"])
            deltas.append(result["p50_ms"] - measured["p50_ms"])
    level_result = {
        "concurrency": level, "rounds": rounds, "requests": sent, "ok": ok, "errors": errors,
        "error_count": sum(errors.values()), "seconds": round(seconds, 3), **latency_figures(latencies),
        "requests_per_s": ok / seconds if seconds else 0.0,
        "items_per_request": args.items, "items_per_s": ok * args.items / seconds if seconds else 0.0,
        "mean_batch_items": float(np.mean(batches)) if batches else None,
        # Text models, from the server's /metrics (None from a server that does not count tokens): real (unpadded)
        # tokens per second, and positions computed per real token.
        "tokens_per_s": real_tokens / seconds if real_tokens and seconds else None,
        "padding_waste": padded_tokens / real_tokens if real_tokens else None,
    }
    if ceilings:
        level_result["ceiling"] = {
            "workers": args.workers, "threads": args.threads, "rounds": ceilings,
            "items_per_s": float(np.median([c["items_per_s"] for c in ceilings])),
            "p50_ms": float(np.median([c["p50_ms"] for c in ceilings])),
        }
        level_result["fraction_of_ceiling"] = float(np.median(fractions))
        level_result["fraction_of_ceiling_by_round"] = [round(f, 4) for f in fractions]
        level_result["p50_minus_in_process_ms"] = float(np.median(deltas))
    tokens = level_result["tokens_per_s"]
    print(f"[kiln] concurrency {level}: {level_result['requests_per_s']:.0f} req/s "
          f"({level_result['items_per_s']:.0f} items/s" + (f", {tokens:.0f} tokens/s" if tokens else "")
          + f"), p50 {level_result['p50_ms']:.2f} ms"
          f", errors {level_result['error_count']}" + (f", {level_result['fraction_of_ceiling']:.2f} of the in-process "
                                                       f"ceiling (median of {rounds} rounds)" if ceilings else ""),
          file=sys.stderr, flush=True)
    return level_result


def run_loadtest_command(args) -> int:
    import httpx

    levels = parse_levels(args.concurrency)
    if args.requests < 1:
        raise UsageError("--requests must be a positive integer")
    if args.workers < 1 or args.items < 1 or (args.rounds is not None and args.rounds < 1):
        raise UsageError("--workers, --items and --rounds must be positive integers")
    url = args.url.rstrip("/")
    headers = {}
    key = api_key_from_env(args.api_key_env)
    if key:
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
    mix = getattr(args, "mix", None)
    if (args.texts or mix) and model["inputs"][0]["datatype"] != "BYTES":
        raise UsageError(f"--texts and --mix apply to text models; {name!r} takes tensors")
    if args.texts and mix:
        raise UsageError("give --texts FILE or --mix NAME, not both")
    items = mix_texts(mix, args.passage_share) if mix else sample_items(model, texts_file=args.texts)
    bodies = [request_body(args.protocol, model, group) for group in group_items(items, args.items)]
    results = []
    rounds = args.rounds if args.rounds else (3 if args.ceiling else 1)
    ceiling = None
    if args.ceiling:
        from kiln.bench.ceiling import Ceiling

        ceiling = Ceiling(args.ceiling, args.variant, args.threads, args.workers, items)
    try:
        for level in levels:
            results.append(run_rounds(url, level, bodies, args, headers, rounds, ceiling, name))
    finally:
        if ceiling is not None:
            ceiling.close()
    report = {"url": url, "model": name, "protocol": args.protocol, "items_per_request": args.items,
              "texts": mix or args.texts, "levels": results}
    if mix == "retrieval":
        report["passage_share"] = args.passage_share
    print_table(results)
    out = write_results(report, results, name, args.out, args.ceiling)
    print(f"wrote {out / 'loadtest.json'} and {out / 'loadtest.png'}")
    return 0


def output_folder(out: str | None, ceiling: str | None) -> Path:
    """Where the results go: --out, else the --ceiling artifact folder (where `kiln deploy kserve` looks for
    loadtest.json), else ./loadtest."""
    if out:
        return Path(out)
    return Path(ceiling) if ceiling else Path("loadtest")


def write_results(report: dict, results: list[dict], name: str, out: str | None, ceiling: str | None) -> Path:
    """Write loadtest.json and loadtest.png; the folder they went to. The default folder (the artifact's) may be
    read-only: then the results go to ./loadtest, with a note, rather than being lost after minutes of load."""
    folder = output_folder(out, ceiling)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "loadtest.json", report)
    except OSError as exc:
        if out:
            raise UsageError(f"cannot write {folder / 'loadtest.json'} ({exc}); pass a writable --out DIR") from exc
        print(f"kiln: cannot write into {folder} ({exc.strerror}); writing to ./loadtest instead", file=sys.stderr)
        folder = Path("loadtest")
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "loadtest.json", report)
    plot(results, folder / "loadtest.png", name)
    return folder


def print_table(results: list[dict]) -> None:
    header = ["concurrency", "req/s", "items/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms", "errors", "mean batch", "ceiling/s", "fraction",
              "p50 - in-process ms"]
    rows = [header]
    for r in results:
        c = r.get("ceiling")
        rows.append([str(r["concurrency"]), f"{r['requests_per_s']:.0f}", f"{r['items_per_s']:.0f}",
                     f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-",
                     f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", str(r["error_count"]),
                     f"{r['mean_batch_items']:.1f}" if r.get("mean_batch_items") else "-",
                     f"{c['items_per_s']:.0f}" if c else "-",
                     f"{r['fraction_of_ceiling']:.2f}" if c else "-",
                     f"{r['p50_minus_in_process_ms']:+.2f}" if c else "-"])
    print(format_table(rows, left_columns=0))


def plot(results: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [r["items_per_s"] for r in results], "o-", label="server")
    if all("ceiling" in r for r in results):
        left.plot(levels, [r["ceiling"]["items_per_s"] for r in results], "s--", label="in-process ceiling")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrency")
    left.set_ylabel("items/s")
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
