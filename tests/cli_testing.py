"""Helpers for the tests that drive the `pyminigpt` command in-process."""

from pyminigpt.cli import main


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(capsys, argv, *needles):
    """The command exits 2 with a one-line message (no traceback) containing every needle; returns it."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert str(needle) in err, err
    return err


def write_names(tmp_path_factory, count: int, seed: int, name: str = "names.txt"):
    """A text file of `count` built-in fantasy names, one per line (what `train --lines` reads)."""
    from pyminigpt.train.data import names_corpus

    path = tmp_path_factory.mktemp("data") / name
    path.write_text("\n".join(names_corpus(count, seed=seed)) + "\n", encoding="utf-8")
    return path
