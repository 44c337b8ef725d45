"""graph_modes' trace summary: command-buffer and CUDA-graph host spans of a profiler trace, counted and
their median taken; other events ignored."""

import gzip
import json

from jtrail.bench.graph_modes import graph_spans


def test_graph_spans_counts_and_medians(tmp_path):
    events = [{"ph": "X", "name": "command_buffer::update", "dur": d} for d in (900, 1000, 1300)]
    events += [{"ph": "X", "name": "cuGraphLaunch (CudaGraph:5)", "dur": d} for d in (10, 30)]
    events += [{"ph": "X", "name": "fusion.12", "dur": 5}, {"ph": "i", "name": "command_buffer::update"},
               {"ph": "X", "name": "command_buffer::execute"}]  # no duration: not a span
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert graph_spans(str(tmp_path)) == {"command_buffer::update": [3, 1000.0],
                                          "cuGraphLaunch (CudaGraph:5)": [2, 20.0]}


def test_device_work_counts_stream_ops_only(tmp_path):
    from jtrail.bench.graph_modes import device_work

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}}]
    ops = [{"ph": "X", "pid": 1, "tid": 7, "name": f"k{i}", "dur": 10} for i in range(6)]
    ops += [{"ph": "X", "pid": 1, "tid": 8, "name": "fusion", "dur": 60},  # derived line: not counted
            {"ph": "X", "pid": 2, "tid": 7, "name": "host", "dur": 99}]  # not a GPU
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "h.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + ops}, f)
    got = device_work(str(tmp_path), steps=2, top=4)
    assert (got["ops_per_step"], got["busy_us_per_step"]) == (3.0, 30.0)
    assert got["ops_by_name"] == {f"k{i}": [0.5, 5.0] for i in range(4)}  # per step; the top 4 by time


def test_every_setting_names_real_config_fields_and_the_default_run_is_known():
    """A typo in a setting would otherwise surface only on the GPU, after the machine's start-up."""
    import dataclasses

    from jtrail.serving.engine.config import EngineConfig

    from jtrail.bench.graph_modes import AB_SETS, DEFAULT_RUN, SETTINGS

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for name, (flags, _env, config) in SETTINGS.items():
        assert set(config) <= fields, name
        assert flags == "" or flags.startswith("--xla_"), name
        EngineConfig(**config)  # valid values
    for name, variants in AB_SETS.items():
        for variant, (config, _switch) in variants.items():
            assert set(config) <= fields, (name, variant)
            EngineConfig(**config)
    assert set(DEFAULT_RUN) <= set(SETTINGS)
