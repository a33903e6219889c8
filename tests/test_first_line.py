"""errors.first_line, the one helper that quotes a library's failure in a one-line error, and its two callers that
cut or trim it (the run dir's damaged-run error, the distributed lost-rank error)."""

from __future__ import annotations

from pathlib import Path

from sparsekd_deploy.core.distributed import _first_words
from sparsekd_deploy.core.rundir import damaged_run
from sparsekd_deploy.errors import first_line


def test_first_line_skips_blank_lines_and_names_the_type_of_an_empty_error():
    assert first_line(OSError("\n  \n  disk full \nmore detail")) == "disk full"
    assert first_line(KeyError()) == "KeyError"
    assert first_line("x" * 10, 5) == "xxxx…"
    assert first_line("x" * 5, 5) == "xxxxx"


def test_damaged_run_quotes_one_cut_line():
    e = damaged_run(Path("run"), "data.safetensors", OSError("\n" + "y" * 300 + "\nsecond line"))
    assert str(e) == (f"run run cannot be resumed: data.safetensors is missing or damaged ({'y' * 199}…); "
                      "pass --overwrite to start the run over")
    assert "(ValueError)" in str(damaged_run(Path("run"), "state.json", ValueError("")))


def test_lost_rank_quotes_gloos_first_sentence_without_its_source_prefix():
    e = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:28827: "
                     "Connection reset by peer. This is typically the result of a peer closing the socket\nmore")
    assert _first_words(e) == "Read error [127.0.0.1]:28827: Connection reset by peer"
    assert _first_words(RuntimeError("z" * 200)) == "z" * 159 + "…"
    assert _first_words(RuntimeError("[pair.cc:1] ")) == "RuntimeError"
    assert _first_words(RuntimeError("")) == "RuntimeError"
