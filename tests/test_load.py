"""Load against the real server: 300 captions (up to 64 tokens each) at concurrency 32 with
MAX_NUM_SEQS=4, eight times the batch the engine runs. Every request is answered (200, or an
explicit 429/503 that is retried), none is lost, the engine never runs more than MAX_NUM_SEQS at
once, and the service's memory (RSS summed over all its processes) stays flat. Prints the figures
docs/RELIABILITY.md reports."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.service import SAMPLE, Service, server_fixture

pytestmark = [pytest.mark.server, pytest.mark.slow]

REQUESTS, CONCURRENCY, MAX_NUM_SEQS, WARM_UP, MAX_TOKENS = 300, 32, 4, 16, 64
RETRY_STATUSES = (429, 503)


loaded_service = server_fixture("loaded_service", MAX_NUM_SEQS=str(MAX_NUM_SEQS))


def service_rss_mib(svc: Service) -> float:
    total_kib = 0
    for pid in svc.leftovers():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


def metric(svc: Service, name: str) -> float:
    text = requests.get(f"{svc.base_url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def test_300_requests_at_concurrency_32_all_answered_none_lost_memory_flat(loaded_service: Service) -> None:
    svc = loaded_service
    audio = SAMPLE.read_bytes()
    try:
        for _ in range(WARM_UP):  # first requests allocate caches: measure after them
            assert svc.caption(audio).status_code == 200
        rss_before = service_rss_mib(svc)

        peak = {"running": 0.0, "waiting": 0.0, "samples": 0.0}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                try:
                    peak["running"] = max(peak["running"], metric(svc, "vllm:num_requests_running"))
                    peak["waiting"] = max(peak["waiting"], metric(svc, "vllm:num_requests_waiting"))
                    peak["samples"] += 1
                except Exception:  # best effort: a figure, not the test's subject
                    pass
                time.sleep(0.1)

        def one(i: int) -> tuple[int, int, float, str]:
            started = time.monotonic()
            for attempt in range(1, 11):
                r = svc.caption(audio, max_tokens=MAX_TOKENS)
                if r.status_code not in RETRY_STATUSES:
                    break
                time.sleep(0.5 * attempt)
            reply_id = r.json()["id"] if r.status_code == 200 else ""
            return r.status_code, attempt, time.monotonic() - started, reply_id

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(REQUESTS)))
        wall = time.monotonic() - started
        done.set()
        watcher.join()
        rss_after = service_rss_mib(svc)

        statuses = [s for s, _, _, _ in results]
        retried = sum(1 for _, a, _, _ in results if a > 1)
        latencies = sorted(t for _, _, t, _ in results)
        print(f"\nload: {REQUESTS} requests, concurrency {CONCURRENCY}, MAX_NUM_SEQS {MAX_NUM_SEQS}: "
              f"{statuses.count(200)} x 200, {retried} retried after 429/503, wall {wall:.1f}s, "
              f"{REQUESTS / wall:.1f} req/s, latency p50 {statistics.median(latencies):.2f}s "
              f"p95 {latencies[int(0.95 * len(latencies)) - 1]:.2f}s max {latencies[-1]:.2f}s; "
              f"peak running {peak['running']:.0f}, peak waiting {peak['waiting']:.0f} "
              f"({peak['samples']:.0f} /metrics samples); "
              f"service RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after "
              f"({100 * (rss_after - rss_before) / rss_before:+.1f}%)")
        assert statuses == [200] * REQUESTS, {s: statuses.count(s) for s in set(statuses)}
        assert len({rid for _, _, _, rid in results}) == REQUESTS, "a reply was lost or duplicated"
        assert peak["running"] <= MAX_NUM_SEQS
        assert rss_after < 1.5 * rss_before
        assert svc.status().returncode == 0
    finally:
        svc.stop()
        svc.force_cleanup()
