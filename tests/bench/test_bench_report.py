"""`pyminigpt bench` (pyminigpt.bench.report): ratios from pytest-benchmark JSON, and one real quick run."""

from __future__ import annotations

import json

import pytest

from pyminigpt.bench import charts as bench_charts
from pyminigpt.bench import report as bench_report


def _bench(group, member, median, **extra):
    return {
        "group": group,
        "name": f"test_x[{member}]",
        "params": {"member": member},
        "stats": {"median": median},
        "extra_info": extra,
    }


def test_report_gives_ratios_over_eager_and_the_peer(tmp_path):
    data = {
        "benchmarks": [
            _bench("layer_norm 8x768", "eager", 4.0, **{"GB/s": 1.5}),
            _bench("layer_norm 8x768", "torch", 2.0, **{"GB/s": 3.0}),
            _bench("layer_norm 8x768", "cpu", 1.0, **{"GB/s": 6.0}),
            _bench("generate B1", "eager", 9.0, role="eager"),  # roles from extra_info win over names
            _bench("generate B1", "transformers", 3.0, role="peer"),
            _bench("generate B1", "pyminigpt", 2.0, role="member", **{"tokens/s": 64.0}),
        ]
    }
    groups = bench_report.load_results(data)
    assert [r.role for r in groups["layer_norm 8x768"]] == ["eager", "peer", "member"]
    markdown = bench_report.render_markdown(groups)
    assert "| `cpu` | 1000 | 4.00x | 2.00x | 6.0 |" in markdown
    assert "| `pyminigpt` | 2000 | 4.50x | 1.50x | 64.0 |" in markdown
    assert "vs transformers" in markdown and "vs torch" in markdown
    charts = bench_charts.plot_groups(groups, tmp_path)
    assert len(charts) == 2 and all(p.stat().st_size > 0 for p in charts)
    assert bench_charts.plot_overview(groups, tmp_path / "overview.png").stat().st_size > 0


def test_strongest_peer_is_the_fastest_peer_and_the_headline_pools_sizes():
    data = {
        "benchmarks": [
            _bench("generate sample B1 prompt32 new64", "transformers", 4.0, role="peer", **{"tokens/s": 16.0}),
            _bench("generate sample B1 prompt32 new64", "ctranslate2-int8", 1.0, role="peer", **{"tokens/s": 64.0}),
            _bench(
                "generate sample B1 prompt32 new64",
                "pyminigpt",
                2.0,
                role="member",
                **{"tokens/s": 32.0, "fraction_of_bound": 0.8},
            ),
            _bench("softmax forward 64x50257 float32", "eager", 2.0),
            _bench("softmax forward 64x50257 float32", "cpu", 1.0),
            _bench("softmax forward 8192x768 float32", "eager", 2.0),
            _bench("softmax forward 8192x768 float32", "cpu", 0.5),
        ]
    }
    groups = bench_report.load_results(data)
    decode = groups["generate sample B1 prompt32 new64"]
    assert bench_report.strongest_peer(decode).member == "ctranslate2-int8"
    # no peer: eager PyTorch is the strongest peer
    assert bench_report.strongest_peer(groups["softmax forward 64x50257 float32"]).member == "eager"
    assert bench_report.family("softmax forward 64x50257 float32") == "softmax forward"
    headline = bench_report.render_headline(groups)
    assert "| `pyminigpt` | 32.0 (0.80) |" in headline
    assert "| generate sample | 1 | `ctranslate2-int8` | 0.50x | - |" in headline
    # geometric mean of 2x and 4x, then the range
    assert "| softmax forward | 2 | `eager` | 2.83x (2.00-4.00) | 2.83x (2.00-4.00) |" in headline
    assert bench_report.render_markdown(groups).startswith("## Headline")


def test_missing_optional_peer_is_reported_not_installed(monkeypatch):
    real_find_spec = bench_report.importlib.util.find_spec
    monkeypatch.setattr(
        bench_report.importlib.util, "find_spec", lambda name: None if name == "ctranslate2" else real_find_spec(name)
    )
    groups = bench_report.load_results(
        {"benchmarks": [_bench("generate greedy B8 prompt32 new64", "pyminigpt", 1.0, **{"tokens/s": 512.0})]}
    )
    markdown = bench_report.render_markdown(groups)
    assert "| `ctranslate2-float32` | not installed |" in markdown
    assert "| `ctranslate2-int8` | not installed |" in markdown


def test_interleaved_decode_summary_becomes_decode_groups(tmp_path):
    summary = {
        "read_bandwidth": 10e9,
        "prompt": 32,
        "new_tokens": 64,
        "batches": [1],
        "members": {
            "transformers": {"seconds": {"greedy B1": 4.0}, "weight_bytes": 500e6},
            "pyminigpt": {"seconds": {"greedy B1": 2.0}, "weight_bytes": 500e6},
            "ctranslate2-int8": {"status": "not installed"},
        },
    }
    decode = bench_report.load_decode_summary(summary)
    (result,) = [r for r in decode["generate greedy B1 prompt32 new64"] if r.member == "pyminigpt"]
    # 64 tokens in 2 s against a bound of 10 GB/s / 500 MB = 20 tokens/s
    assert result.extra["tokens/s"] == 32.0 and result.extra["fraction_of_bound"] == 1.6
    old = bench_report.load_results({"benchmarks": [_bench("generate greedy B1 prompt32 new128", "pyminigpt", 9.0)]})
    merged = bench_report.merge_decode_groups(old, decode)
    assert list(merged) == ["generate greedy B1 prompt32 new64"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [_bench("linear 1x768", "eager", 2.0)]}))
    argv = ["--from-json", str(tmp_path / "bench.json"), "--decode-json", str(tmp_path / "summary.json")]
    assert bench_report.main([*argv, "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Headline" in report and "| `pyminigpt` | 32.0 (1.60) |" in report
    assert (tmp_path / "out" / "overview.png").stat().st_size > 0


def test_group_without_eager_or_peer_shows_dashes():
    groups = bench_report.load_results({"benchmarks": [_bench("g", "cpu", 1.0), _bench("g", "triton", 0.5)]})
    assert "| `triton` | 500.000 | - | - |" in bench_report.render_markdown(groups)


def test_missing_bench_dir_is_a_clear_error(tmp_path, capsys):
    assert bench_report.main(["--e2e", "--bench-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no benchmark suites" in capsys.readouterr().err


@pytest.mark.slow  # the end-to-end suite in a pytest subprocess
def test_quick_end_to_end_run_writes_json_markdown_and_png(tmp_path, monkeypatch):
    # (the compiled member is left out: compiling takes minutes on 2 cores)
    # run from a folder holding a pyminigpt/ source tree, like a checkout's root: the benchmarks
    # must still import the installed package
    (tmp_path / "pyminigpt").mkdir()
    (tmp_path / "pyminigpt" / "__init__.py").write_text("raise ImportError('the source tree shadowed pyminigpt')\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    argv = [
        "--e2e",
        "--quick",
        "--out",
        str(out),
        "-k",
        "(sample-1- or train) and not compile",
    ]
    assert bench_report.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    assert {b["group"] for b in data["benchmarks"]} >= {"generate sample B1 prompt8 new8"}
    markdown = (out / "report.md").read_text()
    assert "### generate sample B1 prompt8 new8" in markdown and "vs transformers" in markdown
    assert "tokens/s" in markdown
    assert "- kernel backends: " in markdown
    assert markdown.index("## Headline") < markdown.index("### generate sample B1 prompt8 new8")
    assert [p.name for p in out.glob("*.png")] == ["overview.png"]


def test_pyminigpt_bench_command_delegates_to_the_report(tmp_path, capsys):
    from pyminigpt import cli

    assert cli.main(["bench", "--e2e", "--bench-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no benchmark suites" in capsys.readouterr().err


def test_the_report_says_how_loaded_the_machine_was_and_flags_noise():
    from pyminigpt.bench import run as bench_run

    data = {
        "benchmarks": [
            _bench("softmax forward 64x50257 float32", "eager", 2.0),
            {**_bench("softmax forward 64x50257 float32", "cpu", 1.0), "stats": {"median": 1.0, "iqr": 0.6}},
            _bench("layer_norm forward 8192x768 float32", "eager", 2.0),
            _bench("layer_norm forward 8192x768 float32", "cpu", 1.0),
        ]
    }
    groups = bench_report.load_results(data)
    markdown = bench_report.render_markdown(groups)
    noisy = markdown.index("Noisy: the rounds of `cpu` spread 60% of its median")
    assert markdown.index("### softmax forward") < noisy < markdown.index("### layer_norm forward")
    assert markdown.count("Noisy:") == 1
    quiet = {"before": 0.3, "after": 1.9, "cpus": 2}
    busy = {"before": 5.2, "after": 7.0, "cpus": 2}
    assert not bench_run.busy(quiet) and bench_run.busy(busy)
    assert "load average 0.30 before the run, 1.90 after it, on 2 logical CPUs" in bench_run.load_lines(quiet)
    assert "busy machine" not in bench_run.load_lines(quiet)
    assert "**busy machine**" in bench_run.load_lines(busy)
    assert "not recorded" in bench_run.load_lines(None)


def test_from_json_keeps_the_recorded_load(tmp_path, capsys):
    data = {
        "benchmarks": [_bench("softmax forward 64x50257 float32", "eager", 2.0)],
        "pyminigpt_load": {"before": 6.0, "after": 6.5, "cpus": 2},
    }
    (tmp_path / "bench.json").write_text(json.dumps(data))
    out = tmp_path / "report"
    assert bench_report.main(["--from-json", str(tmp_path / "bench.json"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "load average 6.00 before the run" in report and "**busy machine**" in report


def test_quick_selects_a_few_representative_groups(tmp_path):
    """--quick's selection: every op suite and the end-to-end suite, a few groups each (not all ~150)."""
    import os
    import subprocess
    import sys

    from pyminigpt.bench.run import QUICK_SELECTION

    env = {**os.environ, "PYMINIGPT_BENCH_QUICK": "1"}
    suites = [str(f) for f in sorted(bench_report.SUITES_DIR.glob("test_bench_*.py"))]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "--import-mode=importlib", *suites, f"-k{QUICK_SELECTION}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    selected = [line for line in result.stdout.splitlines() if "::" in line]
    assert 8 <= len(selected) <= 40, result.stdout[-3000:]
    files = {line.split("::")[0] for line in selected}
    for name in ("layer_norm", "softmax", "sampling", "causal_attention", "linear", "e2e"):
        assert any(name in f for f in files), (name, files)


def test_every_decode_peer_is_reported_as_a_peer():
    """results.PEERS (the report's roles, kept free of the heavy decode imports) names every outside member."""
    from pyminigpt.bench import decode_peers, results

    assert set(decode_peers.PEERS) <= set(results.PEERS)
    assert not {m for m in results.PEERS if m.startswith("pyminigpt")}
