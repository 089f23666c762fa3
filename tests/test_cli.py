"""`python -m infcl`, the "is my GPU path on?" check, runs and agrees on this machine."""

from infcl.__main__ import main


def test_check_runs_and_agrees(capsys):
    assert main() == 0
    out = capsys.readouterr().out
    assert "inf_loss: agrees with naive_loss" in out
    assert "inf_sigmoid_loss: agrees with naive_sigmoid_loss" in out
    assert "device:" in out and "torch" in out
