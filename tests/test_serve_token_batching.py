"""Token-budget, length-aware batching on a real MiniLM server (kiln serve's default for text models): a long text
sent into a steady stream of short ones is answered within its deadline, every answer is the text's own embedding
(padding to another batch's length changes nothing), and /metrics counts batch tokens and padding waste."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import numpy as np
import pytest

from kiln.bench.loadtest import mix_texts
from kiln.models.text_data import sentences

pytestmark = pytest.mark.slow
DEADLINE_S = 6.0


@pytest.fixture(scope="module")
def server(minilm_artifacts):
    from server_process import ServerProcess

    server = ServerProcess(minilm_artifacts, "--variant", "onnx-fp32", "--threads", "1", "--max-batch-size", "16",
                           "--timeout", str(DEADLINE_S)).wait_ready(180)
    yield server
    server.stop()


def test_a_long_text_in_a_stream_of_short_ones_is_answered_within_its_deadline_and_as_if_alone(server):
    passage = next(t for t in mix_texts("retrieval", 1.0) if len(t.split()) > 180)  # 256 tokens, truncated
    queries = sentences()[:24]

    async def go():
        stop = time.monotonic() + 3.0
        answers: dict[str, list[float]] = {}
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE_S + 5) as client:
            async def stream(index: int) -> None:
                n = index
                while time.monotonic() < stop:
                    text = queries[n % len(queries)]
                    n += 1
                    response = await client.post("/predict", json={"text": text})
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        answers[text] = response.json()["embedding"]

            async def long_one() -> tuple[float, int, list[float]]:
                await asyncio.sleep(1.0)  # the stream is running
                started = time.monotonic()
                response = await client.post("/predict", json={"text": passage})
                return time.monotonic() - started, response.status_code, response.json().get("embedding")

            (took, status, embedding), *_ = await asyncio.gather(long_one(), *(stream(i) for i in range(8)))
        return took, status, embedding, answers, statuses

    took, status, embedding, answers, statuses = asyncio.run(go())
    assert status == 200 and took < DEADLINE_S / 2, f"the long text took {took:.2f}s (HTTP {status})"
    assert len(statuses) > 50 and set(statuses) == {200}  # the stream kept flowing, nothing shed
    alone = httpx.post(f"{server.url}/predict", json={"text": passage}).json()["embedding"]
    np.testing.assert_allclose(embedding, alone, atol=1e-4)
    for text in queries[:4]:
        own = httpx.post(f"{server.url}/predict", json={"text": text}).json()["embedding"]
        np.testing.assert_allclose(answers[text], own, atol=1e-4)
    metrics = httpx.get(f"{server.url}/metrics").text
    real = float(re.search(r'^kiln_batch_tokens_real_total\{model="minilm"\} (\S+)$', metrics, re.M).group(1))
    padded = float(re.search(r'^kiln_batch_tokens_padded_total\{model="minilm"\} (\S+)$', metrics, re.M).group(1))
    waste = float(re.search(r'^kiln_batch_padding_waste\{model="minilm"\} (\S+)$', metrics, re.M).group(1))
    assert padded >= real > 0 and waste == pytest.approx(padded / real, rel=1e-3)
    assert waste < 1.5  # the passage was not a padding length for the short ones
