"""An outside load tool on the same trace: guidellm (0.8) fed loadgen's prompts, forced lengths and
arrival times (its `replay` profile), its JSON report read back; and the model's tokenizer exported as
a Hugging Face directory, which guidellm counts tokens with, offline."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jtrail.bench.loadgen import Workload


def guidellm_dataset(path: Path, wl: Workload) -> None:
    """The trace as guidellm rows: prompt text, forced output length, arrival time (replay profile)."""
    with path.open("w") as f:
        for k in range(len(wl)):
            p = wl.prompts[k]
            text = p[-1]["content"] if isinstance(p, list) and p and isinstance(p[0], dict) else p
            f.write(json.dumps({"prompt": text, "output_tokens_count": int(wl.output_len[k]),
                                "relative_timestamp": float(wl.arrival[k])}) + "\n")


def guidellm_exe(given: str | None) -> list[str]:
    """The guidellm command: --guidellm, else on PATH, else beside this interpreter, else
    `python -m guidellm`: wheels installed with `pip install --target DIR` put the script in DIR/bin,
    which is on no PATH, while the package itself imports through PYTHONPATH (the offline GPU box)."""
    if given:
        return [given]
    found = shutil.which("guidellm")
    if found:
        return [found]
    beside = Path(sys.executable).parent / "guidellm"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "guidellm"]


def guidellm_cmd(a: argparse.Namespace, http: str, model: str, data: Path, out_dir: Path,
                 n: int) -> list[str]:
    """guidellm 0.8's CLI (kind=...,key=value options), checked against a live `jtrail serve --mock`."""
    return [*guidellm_exe(a.guidellm), "run",
            "--backend", f"kind=openai_http,target=http://{http},model={model},"
                         "request_format=/v1/chat/completions",
            "--profile", "kind=replay,schedule_turn=timestamp",
            "--data", f"kind=json_file,path={data}",
            "--tokenizer", f"kind=huggingface_auto,model={a.tokenizer_dir}",
            "--constraint", f"kind=max_requests,count={n}",
            "--output", f"kind=json,path={out_dir / 'guidellm.json'}",
            "--disable-console-interactive"]


def run_guidellm(a: argparse.Namespace, http: str, model: str, wl: Workload, work_dir: Path,
                 policy: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One guidellm run of the trace; its dataset, log and report stay in `work_dir` (a scratch
    directory: http_bench keeps the reports in one results file, `keep_reports`)."""
    data = work_dir / f"guidellm_trace_{policy}.jsonl"
    guidellm_dataset(data, wl)
    cmd = guidellm_cmd(a, http, model, data, work_dir, len(wl))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log("  " + " ".join(cmd))
    # + its own start (worker processes importing torch / transformers): ~25-55 s on the 2-core dev
    # machine; a hung guidellm then costs at most this, and http_bench goes on without the door
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.run_timeout + 120)
    (work_dir / f"guidellm_{policy}.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    report = work_dir / "guidellm.json"
    if r.returncode != 0 or not report.exists():
        raise RuntimeError(f"guidellm failed (rc {r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    kept = work_dir / f"guidellm_{policy}.json"
    report.rename(kept)
    return {"command": " ".join(cmd), "report": policy, **guidellm_summary(json.loads(kept.read_text()))}


def keep_reports(work_dir: Path, path: Path) -> Path | None:
    """guidellm's own JSON reports of every run, in one file (run name -> report) with their
    per-request rows left out (MBs; the summaries and distributions stay): what the results keep,
    and one file, not one per run, for the device's few returned files."""
    reports = {}
    for f in sorted(work_dir.glob("guidellm_*.json")):
        doc = json.loads(f.read_text())
        for b in doc.get("benchmarks", []):
            b["requests"] = {k: f"{len(v)} rows left out" for k, v in (b.get("requests") or {}).items()
                             if isinstance(v, list)}
        reports[f.stem.removeprefix("guidellm_")] = doc
    if not reports:
        return None
    path.write_text(json.dumps(reports, separators=(",", ":")))
    return path


def guidellm_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """guidellm's own figures from its JSON report: mean / p50 / p99 request latency (E2E, s) and TTFT
    (s), over its successful requests (request_end - request_start, first token - request_start), plus
    its dispatch delay (how late it sent requests against the trace's arrival times)."""
    b = doc["benchmarks"][0]
    m, reqs = b["metrics"], b["requests"]
    row: dict[str, Any] = {"completed": len(reqs["successful"]),
                           "requests": sum(len(reqs.get(k) or []) for k in ("successful", "errored",
                                                                            "incomplete"))}
    for name, key, scale in (("e2e", "request_latency", 1.0), ("ttft", "time_to_first_token_ms", 1e-3)):
        st = m[key]["successful"]
        row[f"mean_{name}"] = st["mean"] * scale
        row[f"p50_{name}"] = st["percentiles"]["p50"] * scale
        row[f"p99_{name}"] = st["percentiles"]["p99"] * scale
    delay = m.get("request_dispatch_delay", {}).get("successful", {})
    row["dispatch_delay_mean_s"] = delay.get("mean")
    return row


def export_tokenizer(model: str | None, where: str) -> int:
    """Write the served GGUF's tokenizer as a Hugging Face directory (tokenizer.json +
    tokenizer_config.json): the outside tool counts tokens with it, offline (no hub)."""
    from jtrail.models.gguf_loader import open_gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(open_gguf(model or embedded_gguf_path()))
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
           "model_max_length": 8192, **tok.special_tokens}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    print(f"tokenizer -> {d}")
    return 0
