"""`pyminigpt bench` (pyminigpt.bench_report): ratios from pytest-benchmark JSON, and one real quick run."""

from __future__ import annotations

import json
from pathlib import Path

from pyminigpt import bench_report

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


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
    charts = bench_report.plot_groups(groups, tmp_path)
    assert len(charts) == 2 and all(p.stat().st_size > 0 for p in charts)


def test_group_without_eager_or_peer_shows_dashes():
    groups = bench_report.load_results({"benchmarks": [_bench("g", "cpu", 1.0), _bench("g", "triton", 0.5)]})
    assert "| `triton` | 500.000 | - | - |" in bench_report.render_markdown(groups)


def test_missing_bench_dir_is_a_clear_error(tmp_path, capsys):
    assert bench_report.main(["--e2e", "--bench-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no benchmark folder" in capsys.readouterr().err


def test_quick_end_to_end_run_writes_json_markdown_and_png(tmp_path, monkeypatch):
    # run from a folder holding a pyminigpt/ source tree, like a checkout's root: the benchmarks
    # must still import the installed package
    (tmp_path / "pyminigpt").mkdir()
    (tmp_path / "pyminigpt" / "__init__.py").write_text("raise ImportError('the source tree shadowed pyminigpt')\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    argv = ["--e2e", "--quick", "--out", str(out), "--bench-dir", str(BENCH_DIR), "-k", "sample-1- or train"]
    assert bench_report.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    assert {b["group"] for b in data["benchmarks"]} >= {"generate sample B1 prompt8 new8"}
    markdown = (out / "report.md").read_text()
    assert "### generate sample B1 prompt8 new8" in markdown and "vs transformers" in markdown
    assert "tokens/s" in markdown
    assert "- kernel backends: " in markdown
    assert list(out.glob("*.png"))


def test_pyminigpt_bench_command_delegates_to_the_report(tmp_path, capsys):
    from pyminigpt import cli

    assert cli.main(["bench", "--e2e", "--bench-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no benchmark folder" in capsys.readouterr().err
