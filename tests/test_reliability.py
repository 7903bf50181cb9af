"""Issue 9, "Bad arguments": every CLI command answers a user error with one line on stderr and exit status 2.

Unknown models (with close matches), missing paths, impossible batch sizes, unknown backends and contradictory
options, across the commands; none may print a traceback or start work.
"""

from __future__ import annotations

import pytest

from acmix.cli.main import main

MISSING = "/nonexistent/acmix-test/file.pt"

CASES = [
    (["demo", "--channels", "30"], "divisible"),
    (["train", "--model", "acmix_resnt26"], "acmix_resnet26"),
    (["train", "--batch-size", "0"], "batch"),
    (["train", "--data-dir", MISSING], "nonexistent"),
    (["eval", MISSING], "nonexistent"),
    (["eval", MISSING, "--model", "acmix_swin_tiny"], "not found"),
    (["predict", "--checkpoint", MISSING, MISSING], "nonexistent"),
    (["inspect", MISSING], "nonexistent"),
    (["cost", "--models", "no_such_model*"], "no_such_model"),
    (["bench", "op", "--backends", "fastest"], "fastest"),
    (["bench", "op", "--batch", "0"], "batch"),
    (["bench", "model", "acmix_resnet62"], "acmix_resnet"),
    (["bench", "model", "acmix_resnet26", "--batch", "0"], "batch"),
    (["bench", "model", "acmix_resnet26", "--backend", "fastest"], "fastest"),
    (["convert", MISSING, "/tmp/out.safetensors", "--model", "acmix_resnet26"], "nonexistent"),
    (["convert", MISSING, "/tmp/out.safetensors", "--model", "acmix_resnet_26"], "acmix_resnet"),
    (["export", "acmix_resnet_26", "/tmp/out.onnx"], "acmix_resnet"),
]


@pytest.mark.parametrize("argv,mention", CASES, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_user_errors_are_one_line_exit_2(argv, mention, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    assert mention in err[0], err[0]
