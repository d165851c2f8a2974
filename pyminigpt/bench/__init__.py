"""The benchmarks, shipped with the package so that an install can run them (`pyminigpt bench`).

test_bench_<op>.py   one pytest-benchmark suite per op: every backend against eager and its peers
test_bench_e2e.py    generate and the training step against transformers (and ctranslate2)
test_bench_gpu.py    every kernel on a GPU, against the measured roofline, with the issues' targets
conftest.py, utils.py, decode_peers.py, gpu_roofline.py   what the suites share
report.py, charts.py the report of ratios (`pyminigpt bench`): Markdown, JSON, PNG
"""
