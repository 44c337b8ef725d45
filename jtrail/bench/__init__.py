"""The measuring harness behind `benchmarks/`: open-loop load generation against an in-process engine or
a running server, the latency metrics of a run, and the reports the benchmark scripts write.

It sits in the top layer (it drives `jtrail.serving` engines and `jtrail.client`, and reads
`jtrail.datasets`); nothing in `serving/`, `models/` or `kernels/` imports it. The scripts in
`benchmarks/` are thin drivers over it: arguments, the run, the file they write.
"""
