"""Benchmark: the Redis routing-statistics store at DeepSeek-V3 size (58 MoE layers, 256 experts, top-8).

Every writer records 4096 tokens per window and flushes one window delta; 1 and 8 writer processes flush
the same window ids in lockstep (a barrier before each flush), as EP workers do. Measured in one run:

    record      StatsRecorder.record() of one 4096-token step (counting, local); also alone in one process
    encode      encode_window() of one writer window alone in one process (the sender thread's CPU per flush)
    flush       caller's time in flush() (swap arrays + enqueue), and flush() -> acknowledged by Redis;
                Redis's own time per flush, SET + script (INFO commandstats: the part 8 writers queue behind)
    snapshot    StatsStore.snapshot(16): the exact sum of the last 16 windows, read atomically and decoded
    compact     merging 8 writers' deltas of 16 windows into one field each
    memory      Redis MEMORY USAGE per window key

Layer shares (`--shares 8`): 8 writers of one EP group, each flushing its share of the layers of the
group's summed window (8 x 4096 tokens), as `EPGroup` workers do after their flush's all-reduce; timed from
add_counts() of the share to Redis's reply, against the per-writer case of the same size in the same run.

Baseline (same run, same data, same server): each window stored as the raw int64 arrays of RoutingStats
(counts [L,E] + coact [L,E,E] + trans [L-1,E,E], one HSET per writer delta, read back with one pipeline and
summed); every row gives ours / baseline. Targets from the issue: flush < 20 ms, snapshot of 16 windows
< 200 ms.

    .venv/bin/python bench/stats.py                      # writes bench/results/stats.md and stats.json
    .venv/bin/python bench/stats.py --windows 4 --quick  # a smoke run (smaller model), nothing written
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import environment, write_report  # bench/report.py: this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FLUSH_TARGET_MS = 20.0
SNAPSHOT_TARGET_MS = 200.0


def start_redis(workdir: Path, io_threads: int = 1) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            # Redis reads and parses clients' requests on these threads too (8 writers' deltas arrive at once).
            *(["--io-threads", str(io_threads), "--io-threads-do-reads", "yes"] if io_threads > 1 else []),
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(8).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("redis-server did not start")


def synth_ids(seed: int, tokens: int, layers: int, experts: int, top_k: int) -> np.ndarray:
    """Skewed routing like a trained router: per-layer lognormal expert popularity, Gumbel top-k per token."""
    rng = np.random.default_rng(seed)
    out = np.empty((tokens, layers, top_k), np.int32)
    for layer in range(layers):
        logw = rng.normal(0.0, 0.6, experts)
        noisy = logw[None, :] + rng.gumbel(size=(tokens, experts)).astype(np.float32)
        out[:, layer] = np.argpartition(-noisy, top_k - 1, axis=1)[:, :top_k]
    return out


def raw_blob(window) -> bytes:
    """Baseline encoding: RoutingStats' own int64 arrays, dense."""
    stats = window.to_stats()
    return b"".join(np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in (stats.counts, stats.coact, stats.trans))


def group_windows(n: int, shape) -> list:
    """The summed window of n writers' steps, per variant: what a group holds after its flush's all-reduce."""
    from expertmesh.cluster.stats.counting import WindowAccumulator

    tokens, layers, experts, top_k = shape
    out = []
    for v in range(2):
        acc = WindowAccumulator(layers, experts, top_k, top1=False)
        for writer in range(n):
            acc.add(synth_ids(1000 * writer + v, tokens, layers, experts, top_k))
        out.append(acc.take())
    return out


def dense_share(window, first: int, stop: int) -> dict:
    """`add_counts` keywords of layers [first, stop) of a whole window, as a GPU worker's DeviceCounts.take
    hands them over after the group's sum (int32; pairs in the upper triangle)."""
    from expertmesh.cluster.stats.window import triu_pairs

    share = window.share(first, stop)
    E = window.num_experts
    pairs = np.zeros((stop - first, E, E), np.int32)
    a, b = triu_pairs(E)
    pairs[:, a, b] = share.coact
    return {"counts": share.counts.astype(np.int32), "pairs": pairs,
            "trans": share.trans.reshape(-1, E, E).astype(np.int32), "tokens": int(share.tokens)}


def writer_main(url, model, writer, windows, warmup, barrier, queue, shape, baseline_windows, group=None) -> None:
    """One writer process. group: (path of the group's summed windows, writers): this writer flushes its
    layer share of them (the group-shares mode), handed over as a GPU worker's dense counts."""
    import redis

    from expertmesh.cluster.stats.counting import WindowAccumulator
    from expertmesh.cluster.stats.recorder import RedisStatsSink
    from expertmesh.cluster.stats.window import layer_shares

    tokens, layers, experts, top_k = shape
    sink = RedisStatsSink(url, model, layers, experts, top_k, keep=64, max_buffer_bytes=2**31, op_timeout_s=120)
    if group is None:
        variants = [synth_ids(1000 * writer + v, tokens, layers, experts, top_k) for v in range(2)]
        rec = sink.open(f"w{writer}")
    else:
        import pickle

        first, stop = layer_shares(layers, group[1])[writer]
        with open(group[0], "rb") as f:
            variants = [dense_share(w, first, stop) for w in pickle.load(f)]
        rec = sink.open(f"w{writer}", group=(writer, group[1]))
        assert rec.layers == (first, stop)
    rows = []
    for w in range(warmup + windows):
        t_record = t_add = 0.0
        if group is None:
            t0 = time.perf_counter()
            rec.record(variants[w % 2])
            t_record = time.perf_counter() - t0
        barrier.wait()
        t0 = time.perf_counter()
        if group is not None:  # closing a group window starts with handing over its share's counts
            rec.add_counts(**variants[w % 2])
            t_add = time.perf_counter() - t0
        rec.flush(window=w)
        t_call = time.perf_counter() - t0
        rec.wait_idle()
        t_ack = time.perf_counter() - t0
        if w >= warmup:
            rows.append({"record": t_record, "add": t_add, "call": t_call, "ack": t_ack,
                         "rtt": rec.status().last_round_trip_s})
    status = rec.close()
    if group is not None:
        queue.put({"writer": writer, "rows": rows, "baseline": [], "sent": status.sent, "dropped": status.dropped})
        return
    # Baseline: the same windows as raw int64 arrays, one HSET per delta (one round trip), same barrier.
    client = redis.Redis.from_url(url, socket_timeout=600)
    acc = WindowAccumulator(layers, experts, top_k, top1=False)
    base = []
    for w in range(baseline_windows):
        acc.add(variants[w % 2])
        window = acc.take()
        barrier.wait()
        t0 = time.perf_counter()
        client.hset(f"baseline:{{{model}}}:w:{w}", f"d:w{writer}", raw_blob(window))
        base.append(time.perf_counter() - t0)
    queue.put({"writer": writer, "rows": rows, "baseline": base, "sent": status.sent, "dropped": status.dropped})


def pct(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def run_writers(url, model, n, windows, warmup, shape, baseline_windows, group=None):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=writer_main,
                    args=(url, model, i, windows, warmup, barrier, queue, shape, baseline_windows, group))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
    return sorted(results, key=lambda r: r["writer"])


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def baseline_snapshot(client, model, windows, shape):
    """Read the baseline's last `windows` windows in one pipeline and sum them (int64)."""
    tokens, L, E, k = shape
    pipe = client.pipeline(transaction=True)
    for w in range(windows):
        pipe.hgetall(f"baseline:{{{model}}}:w:{w}")
    total = None
    for fields in pipe.execute():
        for blob in fields.values():
            arr = np.frombuffer(blob, dtype=np.int64)
            total = arr.copy() if total is None else total + arr
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=16, help="measured windows per writer")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--writers", default="1,8")
    ap.add_argument("--shares", default="8", help="group sizes whose writers flush layer shares ('' for none)")
    ap.add_argument("--repeat", type=int, default=9, help="snapshot reads per case (the median is reported)")
    ap.add_argument("--quick", action="store_true", help="small model, results not written")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the tables")
    ap.add_argument("--name", default="stats", help="file name of the tables (e.g. stats-16core on a bigger host)")
    ap.add_argument(
        "--redis-io-threads", type=int, default=1, help="redis-server --io-threads (reads too); 1: Redis's default"
    )
    args = ap.parse_args()
    shape = (512, 8, 64, 4) if args.quick else (4096, 58, 256, 8)  # tokens, layers, experts, top_k
    tokens, L, E, k = shape

    import redis

    from expertmesh.cluster.stats.codec import encode_window
    from expertmesh.cluster.stats.counting import WindowAccumulator
    from expertmesh.cluster.stats.store import StatsStore

    tmp = Path(tempfile.mkdtemp(prefix="bench-stats-"))
    proc, port = start_redis(tmp, args.redis_io_threads)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=600)
    server_version = client.info("server")["redis_version"]
    report = {"shape": {"tokens_per_window_per_writer": tokens, "layers": L, "experts": E, "top_k": k}, "cases": {}}
    try:
        # Encoded size and density of one writer window (what one flush sends), and the writer's CPU per
        # step (record) and per flush (encode) alone in this process: the writer cases below run them in
        # n processes at once, which on a small machine measures the sharing of its cores as well.
        acc = WindowAccumulator(L, E, k, top1=False)  # as a live writer records by default (RedisStatsSink.top1)
        steps = [synth_ids(s, tokens, L, E, k) for s in range(2)]
        _, record_t = timed(lambda: (acc.add(steps[0]), acc.take()), args.repeat)
        acc.add(steps[0])
        one = acc.take()
        blob, encode_t = timed(lambda: encode_window(one), 3 * args.repeat)
        new_window = one  # what each writer adds in the warm-read measurement
        report["window_bytes"] = {
            "ours": len(blob),
            "baseline": len(raw_blob(one)),
            "coact_density": float((one.coact > 0).mean()),
            "trans_density": float((one.trans > 0).mean()),
            "layouts": array_layouts(blob),
        }
        report["alone"] = {
            "record_ms_median": statistics.median(record_t) * 1e3,
            "record_ms_min": min(record_t) * 1e3,
            "encode_ms_median": statistics.median(encode_t) * 1e3,
            "encode_ms_min": min(encode_t) * 1e3,
            "repeats": {"record": len(record_t), "encode": len(encode_t)},
        }
        print(json.dumps(report["alone"]), file=sys.stderr)
        modes = [(int(x), False) for x in args.writers.split(",")]
        modes += [(int(x), True) for x in args.shares.split(",") if x]
        for n, shares in modes:
            model = f"bench-{n}" + ("-shares" if shares else "")
            print(f"{n} writer(s){' in layer shares' if shares else ''}: recording and flushing "
                  f"{args.warmup}+{args.windows} windows", file=sys.stderr)
            # Baseline windows: 4 at one writer; 1 at 8 writers (already 8 x 64 MiB raw deltas to read back).
            # The shares mode's baseline is the per-writer case of the same size, in this run.
            bw = 0 if shares else min(args.windows, 4 if n == 1 else 1)
            group = group_path = None
            if shares:
                import pickle

                from expertmesh.cluster.stats.window import layer_shares

                group = group_windows(n, shape)
                group_path = tmp / f"group-{n}.pkl"
                group_path.write_bytes(pickle.dumps(group))
            load_before = os.getloadavg()[0]
            client.config_resetstat()
            results = run_writers(url, model, n, args.windows, args.warmup, shape, bw,
                                  None if group is None else (str(group_path), n))
            # A flush is a SET (the staged delta) and the FLUSH script: Redis's time for both, per flush.
            cmd = client.info("commandstats")
            evals = cmd.get("cmdstat_eval", {})
            flush_usec = evals.get("usec", 0) + cmd.get("cmdstat_set", {}).get("usec", 0)
            rows = [r for res in results for r in res["rows"]]
            # Cold reads: a reader with nothing cached (cache_bytes=0), as a CLI or a fresh controller.
            store = StatsStore.open(url, model=model, socket_timeout=600, cache_bytes=0)
            ids = store.window_ids()
            mem = store.memory()["windows"]
            last16 = ids[-16:]
            snap, snap_t = timed(lambda s=store: s.snapshot(16), args.repeat)
            assert snap.tokens == n * tokens * min(16, len(ids)), "snapshot lost or duplicated tokens"
            case = {
                "writers": n,
                "layer_shares": shares,
                "windows": len(ids),
                "record_ms_p50": pct([r["record"] for r in rows], 50),
                "add_counts_ms_p50": pct([r["add"] for r in rows], 50),
                "flush_call_ms_p50": pct([r["call"] for r in rows], 50),
                "flush_call_ms_p95": pct([r["call"] for r in rows], 95),
                "flush_ack_ms_p50": pct([r["ack"] for r in rows], 50),
                "flush_ack_ms_p95": pct([r["ack"] for r in rows], 95),
                "flush_ack_ms_max": pct([r["ack"] for r in rows], 100),
                "send_round_trip_ms_p50": pct([r["rtt"] for r in rows], 50),
                "redis_ms_per_flush": flush_usec / evals["calls"] / 1e3 if evals.get("calls") else float("nan"),
                "baseline_flush_ms_p50": pct([b for res in results for b in res["baseline"]], 50) if bw else None,
                "baseline_flush_ms_p95": pct([b for res in results for b in res["baseline"]], 95) if bw else None,
                "snapshot16_ms_median": statistics.median(snap_t) * 1e3,
                "memory_per_window_bytes": float(np.mean([mem[w] for w in last16])),
                "dropped": sum(res["dropped"] for res in results),
                "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
            }
            if n > 1:
                t0 = time.perf_counter()
                compacted = store.compact()
                case["compact_s"] = time.perf_counter() - t0
                case["compact"] = compacted
                mem = store.memory()["windows"]
                case["memory_per_window_compacted_bytes"] = float(np.mean([mem[w] for w in last16]))
                again, t = timed(lambda s=store: s.snapshot(16), args.repeat)
                assert np.array_equal(again.counts, snap.counts)
                assert np.array_equal(again.trans, snap.trans) and np.array_equal(again.coact, snap.coact)
                case["snapshot16_compacted_ms_median"] = statistics.median(t) * 1e3
            # Warm reads: the controller's loop. It read the last 16 windows before; since then every
            # writer flushed one more window (n deltas); it reads the last 16 again.
            reader = StatsStore.open(url, model=model, socket_timeout=600)
            reader.snapshot(16)
            header = reader.header()
            warm = []
            for i in range(args.repeat):
                wid = header.head + 1 + i
                for w in range(n):
                    delta = new_window if group is None else group[0].share(*layer_shares(L, n)[w])
                    store.write(wid, delta, header=header, writer=f"extra-{w}", seq=i + 1)
                t0 = time.perf_counter()
                got = reader.snapshot(16)
                warm.append(time.perf_counter() - t0)
            assert got.meta["windows"][-1] == wid and got.meta["deltas"][str(wid)] == n
            case["snapshot16_warm_ms_median"] = statistics.median(warm) * 1e3
            if bw:
                _, bt = timed(lambda m=model, b=bw: baseline_snapshot(client, m, b, shape), args.repeat)
                case["baseline_snapshot_windows"] = bw
                case["baseline_snapshot_ms_median"] = statistics.median(bt) * 1e3
                _, ot = timed(lambda s=store, m=bw: s.snapshot(m), args.repeat)
                case["snapshot_same_windows_ms_median"] = statistics.median(ot) * 1e3
                case["baseline_memory_per_window_bytes"] = float(
                    np.mean([client.memory_usage(f"baseline:{{{model}}}:w:{w}", samples=0) for w in range(bw)])
                )
            report["cases"][f"{n}-shares" if shares else str(n)] = case
            client.flushall()
            print(json.dumps(case, indent=1), file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    report["machine"] = {**environment("redis", "hiredis"), "redis_server": server_version,
                         "redis_io_threads": args.redis_io_threads}
    report["command"] = "python bench/stats.py " + " ".join(sys.argv[1:])
    if args.quick:
        print(json.dumps(report, indent=1))
        return
    md = write_report(args.results, args.name, render(report).rstrip("\n").split("\n"), report)
    print(f"wrote {md}", file=sys.stderr)


def array_layouts(blob: bytes) -> list[str]:
    """'LAYOUT/bits' of each array of an encoded window (counts, coact, trans), from its array headers."""
    from expertmesh.cluster.stats.codec import format as codec

    names = {codec.DENSE: "DENSE", codec.BITMAP: "BITMAP", codec.COO: "COO", codec.GROUPS: "GROUPS"}
    out, offset = [], codec.HEADER.size
    for _ in range(3):
        layout, bits, ibytes, _, xbytes, n, nnz, n_over = codec.ARRAY.unpack_from(blob, offset)
        out.append(f"{names[layout]}/{bits}")
        offset += codec.ARRAY.size
        if layout == codec.GROUPS:
            offset += 2 * (-(-n // 4)) + n_over * ibytes + n_over * 4 * bits // 8
        else:
            m = n if layout == codec.DENSE else nnz
            part = {codec.DENSE: 0, codec.BITMAP: (n + 7) // 8, codec.COO: nnz * ibytes}[layout]
            offset += part + (m * bits + 7) // 8 + n_over * (ibytes + xbytes)
    assert offset == len(blob), "array headers do not add up to the blob"
    return out




def render(r: dict) -> str:
    s = r["shape"]
    m = r["machine"]
    wb = r["window_bytes"]
    lines = [
        "# Routing statistics in Redis: DeepSeek-V3 size",
        "",
        f"Model shape: {s['layers']} MoE layers, {s['experts']} experts, top-{s['top_k']}; "
        f"{s['tokens_per_window_per_writer']} tokens per window per writer. Writers are separate processes "
        "flushing the same window ids in lockstep (a barrier before each flush); one private redis-server "
        "(`--save '' --appendonly no`) on the same machine.",
        "",
        f"Machine: {m['machine']} (writers, Redis and the reader share them; the load averages below say how "
        f"busy the machine was). Python {m['python']}, numpy {m['numpy']}, redis-py {m['redis']} (hiredis "
        f"{m['hiredis']}), redis-server {m['redis_server']} (io-threads {m['redis_io_threads']}). No GPU involved.",
        "",
        f"Command: `{r['command']}`",
        "",
        "Baseline (same run, same data, same server): each writer delta stored as RoutingStats' own int64 "
        "arrays (counts + full coact + trans, one HSET), read back in one MULTI pipeline and summed.",
        "",
        f"One writer window: {wb['ours'] / 2**20:.2f} MiB encoded vs {wb['baseline'] / 2**20:.2f} MiB raw "
        f"(ratio {wb['ours'] / wb['baseline']:.3f}); cells non-zero: coact {100 * wb['coact_density']:.1f}%, "
        f"trans {100 * wb['trans_density']:.1f}%. Layouts written (counts, coact, trans): "
        f"{', '.join(wb.get('layouts', []))}: at this density no index pays for itself, so every cell "
        "keeps 4 bits, and groups of 4 cells with one above 15 are stored whole (the GROUPS layout).",
        "",
        f"Alone in one process (median of {r['alone']['repeats']['record']} / {r['alone']['repeats']['encode']}"
        f"): record() of one step {r['alone']['record_ms_median']:.1f} ms (min {r['alone']['record_ms_min']:.1f}), "
        f"encode_window() of one writer window {r['alone']['encode_ms_median']:.1f} ms "
        f"(min {r['alone']['encode_ms_min']:.1f}).",
        "",
        "| writers | measure | ours | baseline | ours / baseline | target | meets |",
        "|---:|---|---:|---:|---:|---:|:-:|",
    ]

    def row(n, what, ours, base=None, target=None, unit="ms"):
        ratio = f"{ours / base:.3f}" if base else "-"
        b = f"{base:.1f} {unit}" if base else "-"
        t = f"< {target:.0f} {unit}" if target else "-"
        ok = ("yes" if ours < target else "**no**") if target else "-"
        lines.append(f"| {n} | {what} | {ours:.1f} {unit} | {b} | {ratio} | {t} | {ok} |")

    for key, c in r["cases"].items():
        shares = c.get("layer_shares", False)
        n = f"{c['writers']}, layer shares" if shares else key
        per_writer = r["cases"].get(str(c["writers"]), {}) if shares else {}
        if shares:  # the baseline of this mode: the per-writer case of the same size, same run
            c = {**c, **{f"baseline_{name.replace('_ack', '')}": per_writer.get(name) for name in (
                "flush_ack_ms_p50", "flush_ack_ms_p95", "snapshot16_ms_median", "snapshot16_warm_ms_median",
                "memory_per_window_bytes")}}
            row(n, "add_counts() of the share's summed counts (starts closing the window), p50",
                c["add_counts_ms_p50"])
        else:
            row(n, f"record() one 4096-token step (local counting), p50 over {n} writer(s) at once",
                c["record_ms_p50"])
        blocked = "add_counts() + flush() caller blocked" if shares else "flush() caller blocked"
        row(n, f"{blocked} (swap arrays + enqueue), p50", c["flush_call_ms_p50"])
        ack = "add_counts() + flush() until acknowledged by Redis" if shares else "flush() until acknowledged by Redis"
        row(n, f"{ack}, p50", c["flush_ack_ms_p50"], c["baseline_flush_ms_p50"], FLUSH_TARGET_MS)
        row(n, f"{ack}, p95", c["flush_ack_ms_p95"], c["baseline_flush_ms_p95"], FLUSH_TARGET_MS)
        row(n, "Redis server time per flush: staging SET + script (serial across writers)", c["redis_ms_per_flush"])
        row(
            n,
            "snapshot of the last 16 windows, warm: re-read after 1 new window (controller loop)",
            c["snapshot16_warm_ms_median"],
            c.get("baseline_snapshot16_warm_ms_median"),
            SNAPSHOT_TARGET_MS,
        )
        row(
            n,
            "snapshot of the last 16 windows, cold (nothing cached)",
            c["snapshot16_ms_median"],
            c.get("baseline_snapshot16_ms_median"),
            SNAPSHOT_TARGET_MS,
        )
        if "snapshot16_compacted_ms_median" in c:
            row(
                n,
                "snapshot of the last 16 windows, cold, after compact()",
                c["snapshot16_compacted_ms_median"],
                None,
                SNAPSHOT_TARGET_MS,
            )
            row(n, f"compact() {c['compact']['merged']} windows of {c['writers']} deltas", c["compact_s"] * 1e3)
        mib = 2**20
        if "baseline_snapshot_windows" in c:
            bw = c["baseline_snapshot_windows"]
            row(
                n,
                f"snapshot of {bw} windows (vs baseline on the same windows)",
                c["snapshot_same_windows_ms_median"],
                c["baseline_snapshot_ms_median"],
            )
        base_mem = c.get("baseline_memory_per_window_bytes")
        row(
            n,
            "Redis memory per window (MEMORY USAGE)",
            c["memory_per_window_bytes"] / mib,
            None if base_mem is None else base_mem / mib,
            unit="MiB",
        )
        if "memory_per_window_compacted_bytes" in c and not shares:
            row(
                n,
                "Redis memory per window after compact()",
                c["memory_per_window_compacted_bytes"] / mib,
                c["baseline_memory_per_window_bytes"] / mib,
                unit="MiB",
            )
    loads = ", ".join(
        f"{n.replace('-shares', ' in layer shares')} writer(s): {c['load_average_1min_before_after'][0]:.1f} -> "
        f"{c['load_average_1min_before_after'][1]:.1f}"
        for n, c in r["cases"].items()
    )
    shares_note = (
        "- Layer shares (`N, layer shares` rows; `EPGroup.create(stats_shares=True)`, the default): the N workers "
        "of a group sum their window's counts with one all-reduce at the step that closes it (on the GPU, "
        "arrays the workers already hold: not run here) and each writes the rows of its share of the layers "
        "for the whole group's N x 4096 tokens. Each flush then sends ~1/N of a group window, and a window "
        "holds one group window's worth instead of N writer windows. Their baseline column is the per-writer "
        "case of the same N in this run. The writers here get their share's summed counts ready-made (as "
        "DeviceCounts.take hands them over) and are timed from add_counts() to Redis's reply."
    )
    lines += [
        "",
        f"1-minute load average before -> after each case ({mp.cpu_count()} cores): {loads}.",
        "",
        "Notes:",
        "- flush() hands the closed window to the recorder's sender thread, which encodes and sends it; the "
        "caller is blocked only to swap the counting arrays. 'Until acknowledged' is flush() -> the Redis reply "
        "(wait_idle), encoding included: the number the target refers to.",
        "- A flush SETs the encoded delta under a staging key and runs the FLUSH script, which RENAMEs it to its "
        "blob key: Redis moves the value instead of copying it (an HSET or a Lua argument copies megabytes; "
        "that was 7.4 ms of Redis time per flush before). With 8 writers the deltas of one window arrive at "
        "the same moment; what they queue behind is the machine's cores (8 writers encoding at once, "
        "plus Redis reading 8 deltas), not Redis's script time.",
        "- A snapshot lists the fields of the 16 windows in one MULTI/EXEC (the consistent cut), fetches the "
        "fields it has not seen (all of them when cold) and sums exactly; before compaction that is 8 deltas "
        "per window, after it one merged field. A warm reader keeps the encoded fields and the exact running "
        "sum, so it fetches and adds the new window and subtracts the one that left. Decoding (most of a cold "
        "read) runs on up to 4 threads, each summing a share of the windows; replies are parsed by hiredis.",
        shares_note,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
