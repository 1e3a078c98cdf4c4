"""Serving benchmark: latency and throughput of ``python -m nestrec.serve`` under load, per beam width.

What it does, in about two and a half minutes on 2 CPUs:

1. **A model.** ``--artifact DIR`` benchmarks an existing artifact. Without it, the bench trains
   ``recipe=oxygenrec_pretrain debug=smoke`` (MovieLens-1M, first 400 users: 3,120 items, the
   recipe's full-size architecture, a few training steps) and exports it. Latency depends on the
   architecture, the catalogue and the beam, not on how well the weights were trained: beam search
   always expands every beam to the full SID depth.
2. **The no-network bound.** The same decoding called in-process (``Recommender.recommend``) with
   one request at a time, and in batches of 16; plus the reference decoding (encoder memory
   repeated per beam, as ``OxygenPretrainModule.recommend`` does) to show what the serving decoder
   saves.
3. **The service under load.** The real service on 127.0.0.1, driven by a closed-loop load
   generator: C concurrent clients, each sending its next request when the previous one returns,
   for at most ``--cell-requests`` requests or ``--cell-seconds`` per (beam, concurrency) cell.
   Requests rotate over users and the four scenarios. Run twice: micro-batching on
   (``max_batch=32``) and off (``max_batch=1``).

Client and server share the same CPUs, so the HTTP numbers include the load generator's own cost;
the in-process bound has neither HTTP nor a competing client. Results: ``--out`` (JSON) and a PNG
next to it; the table is printed.

    python bench/serve_bench.py                      # train a smoke model, export, benchmark
    python bench/serve_bench.py --artifact DIR       # benchmark an existing artifact
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("homepage", "channel", "related", "search")
QUERIES = ("comedy romance 1990s", "action thriller", "drama 1970s", "animation children's", "horror 1980s")


# -- the model ------------------------------------------------------------------------------------------
def train_and_export(work: Path, env: dict[str, str]) -> Path:
    """``recipe=oxygenrec_pretrain debug=smoke``, then ``nestrec.export``; returns the artifact."""
    run_env = {**env, "NESTREC_OUTPUT_ROOT": str(work / "outputs"), "WANDB_SILENT": "true"}
    started = time.time()
    cmd = [sys.executable, "-m", "nestrec.run", "recipe=oxygenrec_pretrain", "debug=smoke", "logger=none",
           "trainer.enable_progress_bar=false"]  # fmt: skip
    result = subprocess.run(cmd, cwd=work, env=run_env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    [summary] = list((work / "outputs").rglob("summary.json"))
    print(f"[bench] trained {' '.join(cmd[3:])} in {time.time() - started:.0f}s", flush=True)
    artifact = work / "artifact"
    cmd = [sys.executable, "-m", "nestrec.export", f"run={summary.parent}", f"out={artifact}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"export failed:\n{result.stderr[-2000:]}")
    print(f"[bench] {result.stdout.strip()}", flush=True)
    return artifact


# -- request mix -------------------------------------------------------------------------------------------
def request_body(i: int, beam: int, k: int, users: int, genres: list[str]) -> dict:
    """Request ``i`` of the rotation: every scenario, many users, the scenario's own inputs."""
    scenario = SCENARIOS[i % len(SCENARIOS)]
    body = {
        "user": (i * 7919) % max(users, 1),
        "scenario": scenario,
        "beam": beam,
        "k": k,
        "deadline_ms": 60_000,
    }
    if scenario == "channel":
        body["genre"] = genres[i % len(genres)]
    elif scenario == "search":
        body["query"] = QUERIES[i % len(QUERIES)]
    return body


def percentiles(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)} | {
        "mean_ms": round(float(ms.mean()), 2)
    }


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


# -- in-process bound ----------------------------------------------------------------------------------------
def in_process(artifact_dir: Path, beams: list[int], k: int, requests: int) -> list[dict]:
    from nestrec.serve.artifact import load_artifact
    from nestrec.serve.engine import Recommender
    from nestrec.serve.instructions import InstructionSource
    from nestrec.serve.resolve import resolve
    from nestrec.serve.schema import request_model

    torch.set_num_threads(1)
    art = load_artifact(artifact_dir)
    instructions = InstructionSource(art.text_encoder, art.text_dim)
    model = request_model(art.scenarios, art.genres, art.num_items, 100, 512)
    fast, reference = Recommender(art), Recommender(art, shared_memory=False)

    def queries(beam: int, n: int, offset: int = 0):
        out = []
        for i in range(offset, offset + n):
            resolved = resolve(
                model(**request_body(i, beam, min(k, beam), art.num_users, art.genres)), art, instructions
            )
            if resolved.query_text is not None:
                resolved.query.reasoning = instructions.encode_query(resolved.query_text)
            out.append(resolved.query)
        return out

    rows = []
    for beam in beams:
        qs = queries(beam, requests)
        for name, recommender in (("serving decoder", fast), ("reference decoder", reference)):
            n = requests if name == "serving decoder" else max(8, requests // 4)
            recommender.recommend(qs[:2])  # warm-up
            latencies = []
            for q in qs[:n]:
                started = time.perf_counter()
                recommender.recommend([q])
                latencies.append(time.perf_counter() - started)
            rows.append({"beam": beam, "decoder": name, "batch": 1, "requests": n, **percentiles(latencies),
                         "throughput_rps": round(n / sum(latencies), 1)})  # fmt: skip
        for size in (2, 4, 8, 16):  # where micro-batching stops paying (best of 3 passes)
            fast.recommend(qs[:size])
            elapsed = min(_timed(fast.recommend, qs[:size]) for _ in range(3))
            rows.append({"beam": beam, "decoder": "serving decoder", "batch": size, "requests": size,
                         "mean_ms": round(elapsed * 1000 / size, 2), "throughput_rps": round(size / elapsed, 1)})  # fmt: skip
        print(f"[bench] in-process beam {beam}: " + ", ".join(
            f"{r['decoder']} x{r['batch']} {r['mean_ms']} ms/req" for r in rows if r["beam"] == beam), flush=True)  # fmt: skip
    return rows


# -- the service ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m nestrec.serve`` in a child process, ready when ``/readyz`` says so."""

    def __init__(self, artifact: Path, env: dict[str, str], **settings):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [f"artifact={artifact}", f"port={self.port}", *(f"{k}={v}" for k, v in settings.items())]
        fd, name = tempfile.mkstemp(prefix="nestrec-serve-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        with self.log.open("w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "nestrec.serve", *args], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"the service did not start:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.unlink(missing_ok=True)


async def load(
    base: str, bodies: list[dict], concurrency: int, max_requests: int, max_seconds: float
) -> dict:
    """Closed loop: ``concurrency`` clients, each sends its next request when the last one returns."""
    latencies: list[float] = []
    server_ms: list[float] = []  # the service's own latency_ms: without the client and the socket
    batch_sizes: list[int] = []
    errors: dict[int, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        for body in bodies[:concurrency]:  # warm the connections
            await client.post("/v1/recommend", json=body)
        stop_at = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < stop_at:
                body = bodies[issued % len(bodies)]
                issued += 1
                started = time.perf_counter()
                response = await client.post("/v1/recommend", json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    payload = response.json()
                    batch_sizes.append(payload["batch_size"])
                    server_ms.append(payload["latency_ms"])
                else:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        **percentiles(latencies),
        "server_p50_ms": round(float(np.median(server_ms)), 2) if server_ms else None,
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "mean_batch": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
    }


def _serve_defaults() -> dict:
    from nestrec.serve.settings import ServeSettings

    return {k: v for k, v in ServeSettings().model_dump().items() if k not in ("artifact", "port")}


def http_grid(artifact: Path, env: dict, args, info: dict) -> list[dict]:
    rows = []
    for batching, max_batch in (("on", 32), ("off", 1)):
        info.setdefault("server_settings", {})[batching] = {"max_batch": max_batch, "threads": 1}
        server = Server(artifact, env, max_batch=max_batch, threads=1, deadline_ms=60_000)
        try:
            for beam in args.beams:
                k = min(args.k, beam)
                bodies = [request_body(i, beam, k, info["users"], info["genres"]) for i in range(512)]
                for concurrency in args.concurrency:
                    cell = asyncio.run(
                        load(server.base, bodies, concurrency, args.cell_requests, args.cell_seconds)
                    )
                    rows.append({"batching": batching, "beam": beam, "concurrency": concurrency, **cell})
                    print(f"[bench] http batching={batching} beam={beam} c={concurrency}: p50 {cell['p50_ms']} ms "
                          f"p99 {cell['p99_ms']} ms, {cell['throughput_rps']} req/s, batch {cell['mean_batch']}",
                          flush=True)  # fmt: skip
        finally:
            server.stop()
    return rows


# -- report ----------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    """Two markdown tables: the in-process bound (with the batch-size sweep) and the HTTP grid."""
    lines = ["In-process (no network), one torch thread, ms per request:", "",
             "| beam | serving decoder p50 | p99 | reference decoder p50 | batch 2 | batch 4 | batch 8 | batch 16 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for beam in sorted({r["beam"] for r in result["in_process"]}):
        rows = [r for r in result["in_process"] if r["beam"] == beam]
        one = next(r for r in rows if r["decoder"] == "serving decoder" and r["batch"] == 1)
        ref = next(r for r in rows if r["decoder"] == "reference decoder")
        batched = {r["batch"]: r["mean_ms"] for r in rows if r["batch"] > 1}
        lines.append(f"| {beam} | {one['p50_ms']} | {one['p99_ms']} | {ref['p50_ms']} | "
                     + " | ".join(str(batched.get(b, "-")) for b in (2, 4, 8, 16)) + " |")  # fmt: skip
    lines += ["", "HTTP (client on the same CPUs), closed loop:", "",
              "| beam | clients | micro-batching | p50 ms | p95 ms | p99 ms | server p50 ms | req/s | mean batch |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(result["http"], key=lambda r: (r["beam"], r["concurrency"], r["batching"] == "off")):
        lines.append(f"| {r['beam']} | {r['concurrency']} | {r['batching']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['p99_ms']} | {r['server_p50_ms']} | {r['throughput_rps']} | {r['mean_batch']} |")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, beam in enumerate(sorted({r["beam"] for r in result["http"]})):
        for batching, style in (("on", "-"), ("off", "--")):
            rows = sorted((r for r in result["http"] if r["beam"] == beam and r["batching"] == batching),
                          key=lambda r: r["concurrency"])  # fmt: skip
            conc = [r["concurrency"] for r in rows]
            label = f"beam {beam}, batching {batching}"
            lat.plot(conc, [r["p99_ms"] for r in rows], style, marker="o", color=colors[i], label=label)
            thr.plot(
                conc, [r["throughput_rps"] for r in rows], style, marker="o", color=colors[i], label=label
            )
        bound = [r for r in result["in_process"] if r["beam"] == beam and r["batch"] == 1
                 and r["decoder"] == "serving decoder"]  # fmt: skip
        if bound:
            lat.axhline(bound[0]["p99_ms"], color=colors[i], lw=0.8, alpha=0.5)
    levels = sorted({r["concurrency"] for r in result["http"]})
    for ax, name in ((lat, "p99 latency (ms, log)"), (thr, "throughput (req/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    lat.set_yscale("log")
    lat.set_title("p99 latency (thin lines: in-process, one request)")
    thr.set_title("throughput; solid = micro-batching on")
    thr.legend(fontsize=7)
    fig.suptitle(
        f"nestrec.serve on {result['env']['cpus']} CPUs ({result['model']['items']} items)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="benchmark this artifact instead of training a smoke model")
    p.add_argument("--beams", type=int, nargs="+", default=[16, 64, 256, 512])
    p.add_argument("--inprocess-beams", type=int, nargs="+", default=[16, 64, 256, 512])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cell-requests", type=int, default=300, help="at most this many requests per cell")
    p.add_argument("--cell-seconds", type=float, default=3.0, help="at most this long per cell")
    p.add_argument("--inprocess-requests", type=int, default=40)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_bench.json"))
    args = p.parse_args(argv)

    started = time.time()
    load_before = os.getloadavg()
    # One torch thread per process: on CPUs shared with other work, two threads that wait for each
    # other made a beam-16 request 100x slower than one thread (measured: 1.37 s vs 8 ms).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        artifact = Path(args.artifact) if args.artifact else train_and_export(Path(tmp), env)
        manifest = json.loads((artifact / "manifest.json").read_text())
        catalogue = json.loads((artifact / "catalogue.json").read_text())
        info = {"users": manifest["source"]["users"], "genres": catalogue["genres"]}
        bound = in_process(artifact, args.inprocess_beams, args.k, args.inprocess_requests)
        http = http_grid(artifact, env, args, info)
    result = {
        "model": {
            "source": "--artifact"
            if args.artifact
            else "recipe=oxygenrec_pretrain debug=smoke (trained here)",
            "model_version": manifest["model_version"],
            "dataset": manifest["source"]["dataset"],
            "items": manifest["source"]["items"],
            "users": manifest["source"]["users"],
            "architecture": manifest["model"],
        },  # fmt: skip
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "artifact")},
        "server_settings": {**info["server_settings"], "defaults": _serve_defaults()},
        "env": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "torch_threads": 1,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },  # fmt: skip
        "in_process": bound,
        "http": http,
        "wall_s": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"[bench] wrote {out} and {out.with_suffix('.png')} in {result['wall_s']}s")
    return result


if __name__ == "__main__":
    main()
