"""The CLI's connection flags against a real service that requires TLS and a bearer token: `--tls` with `--ca`,
`--token` and `--token-file` each get through; leaving any of them out, or a wrong token, is refused with the exit
code and the one line the CLI documents. The service is the real evaluator (tiny bundle) on loopback, and the
command is `ice score-masks`, whose answer is checked against the masks module."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from client.cli import main
from tests.reliability.harness import make_ca, start_inprocess

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secured(tiny_bundle_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    ca_pem, issue = make_ca("cli")
    key, cert = issue("localhost", server=True)
    (folder / "ca.pem").write_bytes(ca_pem)
    (folder / "server.key").write_bytes(key)
    (folder / "server.pem").write_bytes(cert)
    (folder / "token").write_text(TOKEN + "\n")  # as a mounted Secret holds it, with a newline
    running = start_inprocess("evaluator", tiny_bundle_dir, tls_cert=folder / "server.pem",
                              tls_key=folder / "server.key", auth_token_file=folder / "token")
    truth = np.zeros((24, 32), bool)
    truth[4:20, 6:26] = True
    predicted = np.zeros((24, 32), bool)
    predicted[4:20, 6:16] = True
    for name, mask in (("gt.png", truth), ("pred.png", predicted)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)
    try:
        yield running.port, folder
    finally:
        running.stop(grace=0)


def _score(folder, *connection: str) -> list[str]:
    return ["score-masks", "--predicted", str(folder / "pred.png"), "--ground-truth", str(folder / "gt.png"),
            "--timeout", "600", *connection]


def test_tls_and_the_token_from_a_file_or_a_flag_get_through(secured, capsys):
    port, folder = secured
    target = ["--evaluator", f"localhost:{port}", "--tls", "--ca", str(folder / "ca.pem")]
    for token in (["--token-file", str(folder / "token")], ["--token", TOKEN]):
        assert main([*_score(folder, *target, *token), "--json"]) == 0, capsys.readouterr().err
        scores = json.loads(capsys.readouterr().out)
        assert scores["miou"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.5)
        assert scores["precision"] == pytest.approx(1.0)


@pytest.mark.parametrize(("connection", "code", "says"), [
    (["--tls", "--ca", "{ca}"], 1, "answered UNAUTHENTICATED"),  # no token
    (["--tls", "--ca", "{ca}", "--token", "wrong"], 1, "answered UNAUTHENTICATED"),
    (["--token", TOKEN], 3, "cannot reach the evaluator"),  # plaintext to a TLS port
    (["--tls", "--token", TOKEN], 3, "cannot reach the evaluator"),  # the system roots do not trust this CA
    (["--tls", "--ca", "{ca}", "--token-file", "{missing}"], 2, "cannot read the token file"),
])
def test_what_is_left_out_is_refused_in_one_line(secured, capsys, connection, code, says):
    port, folder = secured
    connection = [c.format(ca=folder / "ca.pem", missing=folder / "no-such-token") for c in connection]
    assert main(_score(folder, "--evaluator", f"localhost:{port}", *connection)) == code
    err = capsys.readouterr().err.strip()
    assert says in err and err.startswith("ice: ") and "\n" not in err, err
