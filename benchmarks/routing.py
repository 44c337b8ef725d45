"""Routing on real replicas: 2 `jtrail serve` processes behind `jtrail route`, one run per routing policy.

    python benchmarks/routing.py --gpus 0,1 [--model GGUF] [--probe DIR] [--prompts sharegpt|mtbench|FILE]
    python benchmarks/routing.py --mock --requests 8      # CPU smoke test (fake tokens, no model)
    python benchmarks/routing.py --gpus 0,0 --mem-fraction 0.45 --policy trail --probe replay \
        --replay replay_all.npz --split bench                # replay: 2 replicas sharing one GPU

1. Start the replicas (replica i on GPU i with --gpus) and a router; wait until all are SERVING.
2. Warm up (every pool prompt, 2 tokens: compiles the prefill buckets), then profile: every pool prompt
   at t=0 with natural EOS (greedy, capped at --max-output) through the router. That gives each prompt
   its forced output length (ignore_eos + max_tokens = the profiled length: every policy does the same
   work, and the probe's predictions stay meaningful since the lengths are the model's own) and the
   capacity (requests/s with everything queued at t=0, excluding the tail where batches empty).
3. One seeded Poisson trace at --load x capacity (same prompts, arrivals and lengths for every policy),
   sized to fit --deadline-s; for each routing policy a fresh router process, replicas drained first
   (idle, no request left) so each policy starts from an empty system. --repeats K runs every policy K
   times on the trace, in alternating order, and averages (one run's spread is wide: see routing.json).
4. Mean / p50 / p99 E2E and TTFT per policy, ratios round-robin / token-aware and least-requests /
   token-aware. Writes benchmarks/results/routing.json (and a copy under $OUT when set).

Length modes: forced profiled lengths (default; max_tokens = the true length, and the engine caps its
length estimates at max_tokens, so estimates never exceed the truth), --natural-eos (max_tokens = the
cap for every request, the model stops itself: no length leaks to the replicas), --lengths sharegpt
(forced ShareGPT answer lengths, unrelated to what the probe sees in the prompt), --replay (the replay
set's requests: token-id prompts, each carrying its recorded answer, `forced_output_ids`, so the engine
emits exactly that answer; max_tokens = --max-output for every request, so no length leaks; the profile
run sends every pool request at t=0 for the capacity).

A run that does not finish every request within --run-timeout reports how many it finished and is not
used for a ratio: ratios come only from repeats in which both routers finished everything, and the
bars only when every repeat did.

The driver itself never imports JAX: the replicas own the accelerators.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from loadgen import Workload, arrival_times, drive_grpc  # noqa: E402

from jtrail.provenance import git_commit  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "routing.json"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --- processes -------------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], pattern: str, log_dir: Path,
                 timeout_s: float):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.err = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
                                     start_new_session=True)
        self.target = self._wait_line(pattern, timeout_s)

    def _wait_line(self, pattern: str, timeout_s: float) -> str:
        """The first stdout line matching `pattern` (the server prints it once bound); read in a thread
        so a silent crash or hang hits the timeout instead of blocking."""
        import threading

        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                m = re.search(pattern, line)
                if m:
                    found.append(m.group(1))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout_s)
        if not found:
            self.stop()
            tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.name} did not start within {timeout_s:.0f} s "
                               f"(rc {self.proc.poll()}); log tail:\n{tail}")
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        return found[0]

    def _drain_stdout(self) -> None:
        for _ in self.proc.stdout:  # type: ignore[union-attr]
            pass

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.err.close()


def jtrail_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jtrail.cli", *args]


def start_replica(i: int, a: argparse.Namespace, log_dir: Path) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.gpus:
        env["CUDA_VISIBLE_DEVICES"] = a.gpus.split(",")[i]
    if a.mem_fraction:  # replicas sharing one GPU: each preallocates only its share
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(a.mem_fraction)
    args = ["serve", "--host", "127.0.0.1", "--port", "0", "--no-http", "--policy", a.policy,
            "--slots", str(a.slots), "--pages", str(a.pages), "--page-size", str(a.page_size),
            "--max-context", str(a.max_context), "--max-queue", str(a.max_queue), "--grace", "1"]
    if a.mock:
        args += ["--mock", "--mock-step-delay", str(a.mock_step_delay)]
    else:
        if a.model:
            args += ["--model", a.model]
        if a.probe:
            args += ["--probe", a.probe]
        if a.policy in ("trail", "gittins", "srpt-oracle"):
            args += ["--aging", str(a.aging)]
        args += ["--decode-steps", str(a.decode_steps)]
    return Proc(f"replica{i}", jtrail_cmd(*args), env, r"serving on ([\d.]+:\d+)", log_dir, a.start_timeout)


def start_router(policy: str, targets: list[str], a: argparse.Namespace, log_dir: Path) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["route", "--replicas", ",".join(targets), "--router", policy, "--host", "127.0.0.1",
            "--port", "0", "--page-size", str(a.page_size), "--expected-tokens", str(a.expected_tokens),
            "--grace", "1"]
    return Proc(f"router-{policy}", jtrail_cmd(*args), env, r"routing on ([\d.]+:\d+)", log_dir, 60.0)


# --- measurements ----------------------------------------------------------------------------------
def wait_serving(targets: list[str], timeout_s: float) -> None:
    from jtrail.client import Client

    deadline = time.monotonic() + timeout_s
    for t in targets:
        with Client(t) as c:
            while True:
                try:
                    if c.health(timeout=2.0) == "SERVING":
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{t} never became SERVING")
                time.sleep(0.1)


def replica_stats(targets: list[str]) -> list[Any]:
    from jtrail.client import Client

    out = []
    for t in targets:
        with Client(t) as c:
            out.append(c.stats(timeout=10.0))
    return out


def drain(targets: list[str], timeout_s: float) -> float:
    """Wait until every replica is idle (nothing waiting or running, no KV page held); seconds waited."""
    t0 = time.monotonic()
    while True:
        st = replica_stats(targets)
        if all(s.waiting == 0 and s.running == 0 and s.swapped == 0 and s.pages_used == 0 for s in st):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"replicas not idle after {timeout_s:.0f} s: {[str(s) for s in st]}")
        time.sleep(0.1)


def finished_counts(targets: list[str]) -> list[int]:
    return [sum(s.finished_by_reason.values()) for s in replica_stats(targets)]


def summarize(res: Any) -> dict[str, float]:
    ok = res.completed
    e2e = (res.finish - res.arrival)[ok]
    ttft = (res.first_token - res.arrival)[ok]
    row: dict[str, float] = {"completed": int(ok.sum()), "requests": len(ok), "wall_s": float(res.wall_s)}
    for name, x in (("e2e", e2e), ("ttft", ttft)):
        row[f"mean_{name}"] = float(x.mean()) if len(x) else float("nan")
        for q in (50, 99):
            row[f"p{q}_{name}"] = float(np.percentile(x, q)) if len(x) else float("nan")
    return row


def mean_rows(rows: list[dict]) -> dict:
    """One router's repeats: numeric fields averaged, with each repeat's mean E2E / TTFT kept."""
    out: dict = {k: float(np.mean([r[k] for r in rows])) for k, v in rows[0].items()
                 if isinstance(v, int | float) and k not in ("completed", "requests")}
    out["completed"] = int(sum(r["completed"] for r in rows))
    out["requests"] = int(sum(r["requests"] for r in rows))
    out["mean_e2e_per_repeat"] = [r["mean_e2e"] for r in rows]
    out["mean_ttft_per_repeat"] = [r["mean_ttft"] for r in rows]
    out["p99_e2e_per_repeat"] = [r["p99_e2e"] for r in rows]
    out["completed_per_repeat"] = [r["completed"] for r in rows]
    out["all_completed_per_repeat"] = [r["completed"] == r["requests"] for r in rows]
    out["per_replica_finished"] = [r["per_replica_finished"] for r in rows]
    return out


def load_pool(a: argparse.Namespace) -> list[Any]:
    """Seeded sample of prompts, as chat messages (the servers apply the model's template) or raw text.
    Over-long prompts are skipped at ~4 characters a token (the servers reject what still does not fit)."""
    from jtrail import datasets

    texts = datasets.prompt_texts(a.prompts)
    order = np.random.default_rng(a.seed).permutation(len(texts))
    pool: list[Any] = []
    for i in order:
        t = texts[int(i)]
        if 0 < len(t) <= 4 * a.max_prompt_tokens:
            pool.append(t if a.raw else [{"role": "user", "content": t}])
            if len(pool) >= a.pool:
                break
    return pool


def load_replay_pool(a: argparse.Namespace) -> tuple[list[list[int]], list[np.ndarray]]:
    """Seeded sample of the replay split's requests that fit --max-context and --max-prompt-tokens:
    token-id prompts and their recorded answers (cut to --max-output, and to --max-answer-tokens if set)."""
    from jtrail.replay import ReplaySet

    rs = ReplaySet.load(a.replay).subset(a.split)
    cut = min(a.max_output, a.max_answer_tokens or a.max_output)
    prompts: list[list[int]] = []
    answers: list[np.ndarray] = []
    for i in np.random.default_rng(a.seed).permutation(len(rs)):
        p, ans = rs.prompts[int(i)], rs.answers[int(i)][:cut]
        if len(p) <= a.max_prompt_tokens and len(p) + len(ans) < a.max_context:
            prompts.append(p.astype(np.int32).tolist())
            answers.append(ans.astype(np.int32))
            if len(prompts) >= a.pool:
                break
    return prompts, answers


def sharegpt_lengths(n: int, cap: int, seed: int) -> np.ndarray:
    """n seeded answer lengths of the simulator's routing section (ShareGPT, clipped to [1, cap])."""
    from simulate import routing_lengths

    return routing_lengths(n, np.random.default_rng(seed), max_output=cap)[1]


def device_name(a: argparse.Namespace) -> str:
    if a.mock:
        return "cpu (mock engines)"
    if a.gpus and shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            chosen = [n for n in names if n.split(",")[0].strip() in a.gpus.split(",")]
            return f"{len(chosen)} x {chosen[0].split(',', 1)[1].strip()}" if chosen else "gpu"
        except (OSError, subprocess.SubprocessError, IndexError):
            return "gpu"
    return "cpu" if not a.gpus else "gpu"


def ratio_table(table: dict[str, dict]) -> dict[str, Any]:
    """X / token-aware mean E2E, TTFT and p99 E2E, from the repeats in which both X and token-aware
    finished every request (None when there is none: an unfinished run says nothing about its mean);
    per-repeat ratios beside them (None for an incomplete repeat)."""
    ta = table["token-aware"]
    out: dict[str, Any] = {}
    for name, key in (("round-robin", "rr"), ("least-requests", "least_requests"),
                      ("power-of-two", "power_of_two")):
        if name not in table:
            continue
        x = table[name]
        ok = [a and b for a, b in zip(x["all_completed_per_repeat"], ta["all_completed_per_repeat"],
                                      strict=True)]
        used = [i for i, good in enumerate(ok) if good]
        out[f"{key}_repeats_used"] = len(used)
        for field, per in (("mean_e2e", "mean_e2e_per_repeat"), ("mean_ttft", "mean_ttft_per_repeat"),
                           ("p99_e2e", "p99_e2e_per_repeat")):
            out[f"{key}_over_token_aware_{field}"] = (
                float(np.mean([x[per][i] for i in used]) / np.mean([ta[per][i] for i in used]))
                if used else None)
        out[f"{key}_over_token_aware_mean_e2e_per_repeat"] = [
            x["mean_e2e_per_repeat"][i] / ta["mean_e2e_per_repeat"][i] if good else None
            for i, good in enumerate(ok)]
    return out


def real_bars(table: dict[str, dict], ratios: dict[str, Any], complete: bool) -> dict[str, Any]:
    """The issue's real-replica bars: only from runs in which every request of every repeat finished."""
    get = (lambda k: ratios.get(k)) if complete else (lambda k: None)
    bars = {"rr_over_token_aware_mean_e2e_real": get("rr_over_token_aware_mean_e2e"),
            "least_requests_over_token_aware_mean_e2e_real": get("least_requests_over_token_aware_mean_e2e"),
            "least_requests_over_token_aware_p99_e2e_real": get("least_requests_over_token_aware_p99_e2e"),
            "every_request_finished": complete}
    if complete:
        ta = table["token-aware"]["mean_e2e"]
        bars["token_aware_best"] = all(r["mean_e2e"] >= ta for r in table.values())
    return bars


def carry_over(earlier: dict, doc: dict) -> dict:
    """This run's document, with the earlier file's `history` (and its real-replica run, if it was one,
    appended to it), its simulator section and its simulator bars (keys naming sim) kept."""
    history = list(earlier.get("history", []))
    if "table" in earlier:  # the earlier top level was a real-replica run
        history.append({k: v for k, v in earlier.items() if k not in ("history", "sim8_replay")})
    bars = {k: v for k, v in earlier.get("bars", {}).items() if "sim" in k}
    out = {**doc, "bars": {**bars, **doc["bars"]}, "history": history}
    if "sim8_replay" in earlier:
        out["sim8_replay"] = earlier["sim8_replay"]
    return out


# --- main ------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF / HF dir / named shape; default: embedded SmolLM2")
    p.add_argument("--probe", default=None, help="probe directory (default: the shipped one); 'none': off")
    p.add_argument("--mock", action="store_true", help="mock engines (fake tokens, no model): a smoke test")
    p.add_argument("--replay", default=None, help="replay set (.npz): requests carry their recorded answers")
    p.add_argument("--split", default="bench", help="replay split (never the probe's training split)")
    p.add_argument("--max-answer-tokens", type=int, default=0,
                   help="cut replayed answers to this many tokens (0: up to --max-output; CPU smoke runs)")
    p.add_argument("--mem-fraction", type=float, default=0.0,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION of each replica (replicas sharing a GPU: --gpus 0,0)")
    p.add_argument("--mock-step-delay", type=float, default=0.005)
    p.add_argument("--gpus", default="", help="comma list: replica i runs with CUDA_VISIBLE_DEVICES=gpus[i]")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--policy", default="fcfs", help="engine policy of the replicas (fcfs, trail, ...)")
    p.add_argument("--aging", type=float, default=0.0, help="trail/gittins aging (as `jtrail serve`)")
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--routers", default="round-robin,least-requests,token-aware",
                   help="routing policies to compare (token-aware is the reference of the ratios)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every router on the same trace, in alternating order (averaged)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--expected-tokens", type=float, default=256.0, help="`jtrail route --expected-tokens`")
    p.add_argument("--prompts", default="sharegpt", help="sharegpt, mtbench or a JSONL file of prompts")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, not chat messages")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256, help="cap of the profiled (forced) lengths")
    p.add_argument("--lengths", default="profile", choices=["profile", "sharegpt"],
                   help="forced output lengths: the model's own (profiled) or ShareGPT's answer lengths "
                        "(capped at --max-output; varied, as the simulator's routing section)")
    p.add_argument("--natural-eos", action="store_true",
                   help="policy runs stop at the model's eos (max_tokens = --max-output), not forced lengths")
    p.add_argument("--pool", type=int, default=256, help="prompts profiled (the capacity run)")
    p.add_argument("--load", type=float, default=0.9, help="fraction of the measured capacity")
    p.add_argument("--requests", type=int, default=600, help="most requests per policy run")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=360.0,
                   help="wall budget of the whole run: the trace is sized to fit")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds for a replica to come up")
    p.add_argument("--run-timeout", type=float, default=150.0, help="most seconds of one policy run")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    routers = [r for r in a.routers.split(",") if r]
    if "token-aware" not in routers:
        raise SystemExit("--routers must include token-aware (the reference of the ratios)")
    if a.repeats < 1 or a.replicas < 1:
        raise SystemExit(f"--repeats and --replicas must be >= 1, got {a.repeats} and {a.replicas}")
    if a.gpus and len(a.gpus.split(",")) < a.replicas:
        raise SystemExit(f"--gpus names {len(a.gpus.split(','))} devices for {a.replicas} replicas")
    command = "python benchmarks/routing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log_dir = Path(tempfile.mkdtemp(prefix="jtrail_routing_"))  # process logs (their tails show on failure)
    answers: list[np.ndarray] | None = None
    if a.replay:
        pool, answers = load_replay_pool(a)  # type: ignore[assignment]
    else:
        pool = load_pool(a)
    if not pool:
        raise SystemExit(f"no prompt of at most {a.max_prompt_tokens} tokens in {a.replay or a.prompts}")
    log(f"{len(pool)} prompts; starting {a.replicas} replicas")
    reps: list[Proc] = []
    router: Proc | None = None
    try:
        # Replicas load in parallel (each process prints its address once bound).
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(a.replicas) as ex:
            futs = [ex.submit(start_replica, i, a, log_dir) for i in range(a.replicas)]
            errors = []
            for f in futs:
                try:
                    reps.append(f.result())
                except Exception as e:  # noqa: BLE001 - stop the others, then report
                    errors.append(e)
            if errors:
                raise errors[0]
        targets = [r.target for r in reps]
        wait_serving(targets, a.start_timeout)
        log(f"replicas SERVING at {targets}")

        router = start_router("least-requests", targets, a, log_dir)
        n_pool = len(pool)
        warm = Workload(pool, np.zeros(n_pool), np.full(n_pool, 2), forced=True,
                        request_ids=[f"warm{i}" for i in range(n_pool)])
        drive_grpc(router.target, warm, timeout_s=a.run_timeout)
        log("warm-up done (every prompt prefilled once)")
        drain(targets, 60.0)
        if answers is not None:  # replay: every pool request with its recorded answer, all at t=0
            prof = Workload(pool, np.zeros(n_pool), np.zeros(n_pool), max_tokens=a.max_output,
                            answers=answers, request_ids=[f"prof{i}" for i in range(n_pool)])
        else:
            prof = Workload(pool, np.zeros(n_pool), np.full(n_pool, a.max_output), forced=False,
                            request_ids=[f"prof{i}" for i in range(n_pool)])
        res = drive_grpc(router.target, prof, timeout_s=a.run_timeout)
        ok = res.completed & (res.output_tokens > 0)
        fin = np.sort(res.finish[ok])
        k = len(fin) - a.slots * a.replicas  # exclude the tail where batches are no longer full ...
        if k < len(fin) // 2:  # ... unless that leaves too little (a pool not much larger than the slots)
            k = len(fin)
        capacity = float(k / fin[k - 1]) if len(fin) else float("nan")
        prompts = [p for p, good in zip(pool, ok, strict=True) if good]
        kept = [ans for ans, good in zip(answers, ok, strict=True) if good] if answers is not None else None
        lengths = np.minimum(res.output_tokens[ok], a.max_output).astype(np.int64)
        router.stop()
        router = None
        if not len(prompts) or not np.isfinite(capacity) or capacity <= 0:
            raise RuntimeError("the profiling run completed no request")
        log(f"profiled {len(prompts)} prompts: mean output {lengths.mean():.1f} tokens; capacity "
            f"{capacity:.2f} req/s through the router")
        drain(targets, 60.0)

        if a.lengths == "sharegpt" and not a.natural_eos:
            # capacity scales with 1 / mean output length (a decode step's cost barely depends on it);
            # the trace takes the first n of these draws
            drawn = sharegpt_lengths(max(4096, a.requests), a.max_output, a.seed + 2)
            capacity *= float(lengths.mean()) / float(drawn.mean())
            lengths = drawn
        # Size the trace so every policy fits in what is left of the deadline.
        rate = a.load * capacity
        left = a.deadline_s - (time.perf_counter() - T0) - 15.0
        per_policy = min(left / (len(routers) * a.repeats), a.run_timeout)
        tail = float(np.max(lengths)) / max(capacity / a.replicas / a.slots * float(lengths.mean()), 1e-9)
        # time to finish the last arrivals: one long request, and at least a fifth of the run for the queue
        # they find (a run that stops at per_policy drops what is unfinished from the means)
        tail = min(max(tail, per_policy / 5), per_policy / 2)
        n = int(min(a.requests, max(a.min_requests, (per_policy - tail) * rate)))
        rng = np.random.default_rng(a.seed + 1)
        pick = rng.integers(0, len(prompts), n)
        # Forced lengths: ignore_eos, max_tokens = the profiled length (identical work for every policy).
        # --natural-eos instead sends max_tokens = --max-output and lets the model stop (no true length in
        # max_tokens, which caps the engine's length predictions; greedy decoding repeats the profile).
        if kept is not None:
            out_len = np.array([len(kept[i]) for i in pick], np.int64)
        elif a.natural_eos:
            out_len = np.full(n, a.max_output)
        elif a.lengths == "sharegpt":
            out_len = lengths[:n]
        else:
            out_len = lengths[pick]
        expected_len = lengths[pick] if a.natural_eos else out_len  # what the requests generate
        if kept is not None:  # the nominal cap for every request: max_tokens leaks no length
            wl = Workload([prompts[i] for i in pick], arrival_times(n, rate, a.seed), out_len,
                          max_tokens=a.max_output, answers=[kept[i] for i in pick],
                          request_ids=[f"r{i}" for i in range(n)])
        else:
            wl = Workload([prompts[i] for i in pick], arrival_times(n, rate, a.seed), out_len,
                          forced=not a.natural_eos, request_ids=[f"r{i}" for i in range(n)])
        log(f"trace: {n} requests at {rate:.2f} req/s ({a.load:.0%} of capacity), "
            f"{per_policy:.0f} s per policy")

        runs: dict[str, list[dict]] = {name: [] for name in routers}
        for rep in range(a.repeats):  # alternate the order: no router always runs first or last
            for name in (routers if rep % 2 == 0 else routers[::-1]):
                waited = drain(targets, 60.0)
                before = finished_counts(targets)
                router = start_router(name, targets, a, log_dir)
                out = drive_grpc(router.target, wl, timeout_s=per_policy)
                router.stop()
                router = None
                row = summarize(out)
                after = finished_counts(targets)
                row["per_replica_finished"] = [x - y for x, y in zip(after, before, strict=True)]
                row["drain_s_before"] = waited
                runs[name].append(row)
                if row["completed"] < n:
                    log(f"{name} [{rep + 1}/{a.repeats}]: {n - row['completed']} of {n} requests unfinished "
                        f"after {per_policy:.0f} s: this repeat gives no ratio")
                log(f"{name:15s} [{rep + 1}/{a.repeats}] done {row['completed']}/{n}: mean E2E "
                    f"{row['mean_e2e']:.3f} s, p99 {row['p99_e2e']:.3f} s, "
                    f"mean TTFT {row['mean_ttft']:.3f} s, "
                    f"split {row['per_replica_finished']}")
        table = {name: mean_rows(rows) for name, rows in runs.items()}
    finally:
        if router is not None:
            router.stop()
        for r in reps:
            r.stop()

    ratios = ratio_table(table)
    complete = all(r["completed"] == r["requests"] for r in table.values())
    ta = table["token-aware"]
    doc = {
        "command": command, "device": device_name(a),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "workload": {"prompts": f"replay {a.replay} split {a.split}" if a.replay else a.prompts,
                     "pool_profiled": len(pool), "usable": len(prompts),
                     "mode": "replay (recorded answers, forced_output_ids; max_tokens = max_output)"
                     if a.replay else "natural EOS (greedy, max_tokens = max_output)" if a.natural_eos
                     else "forced lengths (ShareGPT answer lengths, capped)" if a.lengths == "sharegpt"
                     else "forced lengths (natural-EOS greedy profile, capped)",
                     "output_len_mean": float(expected_len.mean()),
                     "output_len_p50": float(np.median(expected_len)),
                     "requests": n, "rate_req_s": rate},
        "capacity_req_s": capacity, "table": table, "ratios": ratios, "all_completed": complete,
        "bars": real_bars(table, ratios, complete),
    }
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():  # keep what the file holds besides this run: earlier runs, the simulator's bars
        doc = carry_over(json.loads(out_path.read_text()), doc)
    out_path.write_text(json.dumps(doc, indent=2))
    if os.environ.get("OUT"):
        copy = Path(os.environ["OUT"]) / out_path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if copy.resolve() != out_path.resolve():
            shutil.copy(out_path, copy)
    print(f"\n| router ({a.replicas} x {a.policy}, {a.load:.0%} load, {n} req) | done | mean E2E | p50 E2E | "
          "p99 E2E | mean TTFT | p99 TTFT | E2E / token-aware |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['completed']}/{r['requests']} | {r['mean_e2e']:.3f} | {r['p50_e2e']:.3f} | "
              f"{r['p99_e2e']:.3f} | {r['mean_ttft']:.3f} | {r['p99_ttft']:.3f} | "
              f"{r['mean_e2e'] / ta['mean_e2e']:.3f} |")
    print(f"-> {out_path}" + ("" if complete else "  (some requests did not finish: see the table; "
                               "those repeats give no ratio and the bars are not set)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
