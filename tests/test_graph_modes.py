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
