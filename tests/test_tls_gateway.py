"""HTTPS on the gateway (gunicorn's TLS, inference/tls.py's policy), tested on a real gunicorn with a throwaway CA:
mutual TLS, versions and suites (sslyze), HSTS, the test tool over it, rotation, and bad files stopping the start."""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from inference.tls import TLSConfigError, tls_files
from tests.conftest import PROJECT_ROOT, RunningServer, write_study
from tests.tls_certs import Pki, make_pki, ssl_refused, tls11_context

#: Every TLS 1.2 suite the policy allows is forward secret (ECDHE/DHE) and AEAD (GCM or ChaCha20-Poly1305).
ALLOWED_TLS12 = ("ECDHE", "DHE")
ALLOWED_AEAD = ("GCM", "CHACHA20")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def wait_https(running: RunningServer, pki: Pki, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise RuntimeError(f"server exited with {running.process.returncode}:\n{running.log()}")
        try:
            if requests.get(f"{running.url}/healthcheck", timeout=2, verify=str(pki.ca_file),
                            cert=(str(pki.client_cert), str(pki.client_key))).text == "READY":
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not READY after {timeout}s:\n{running.log()}")


@pytest.fixture(scope="module")
def https_server(pki, tmp_path_factory) -> Iterator[RunningServer]:
    """The gateway over HTTPS with client certificates required; its certificate files are copies, to rotate."""
    root = tmp_path_factory.mktemp("https")
    cert, key = root / "server.pem", root / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    (root / "data").mkdir()
    running = RunningServer({"INFERENCE_TLS_CERT": str(cert), "INFERENCE_TLS_KEY": str(key),
                             "INFERENCE_TLS_CLIENT_CA": str(pki.ca_file), "INFERENCE_ENABLE_MOCKS": "1",
                             "INFERENCE_DATA_ROOT": str(root / "data"), "INFERENCE_OUTPUT_ROOT": str(root / "jobs")},
                            root, wait=False)
    running.url = f"https://127.0.0.1:{running.port}"
    running.cert, running.key = cert, key
    try:
        wait_https(running, pki)
        yield running
    finally:
        running.stop()


def address(running: RunningServer) -> tuple[str, int]:
    return ("127.0.0.1", running.port)


def negotiated(running: RunningServer, context: ssl.SSLContext) -> tuple[str, str, bytes]:
    """TLS version, cipher suite and the server certificate (DER) of one connection with ``context``."""
    with socket.create_connection(address(running), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.version(), tls.cipher()[0], tls.getpeercert(binary_form=True)


def test_a_trusted_client_gets_tls13_and_at_tls12_an_aead_forward_secret_suite(https_server, pki):
    version, cipher, _ = negotiated(https_server, pki.client_context())
    assert version == "TLSv1.3" and cipher in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                                               "TLS_CHACHA20_POLY1305_SHA256")
    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher, _ = negotiated(https_server, tls12)
    assert version == "TLSv1.2" and cipher.startswith(ALLOWED_TLS12) and any(a in cipher for a in ALLOWED_AEAD)


def test_every_answer_carries_strict_transport_security(https_server, pki):
    auth = {"verify": str(pki.ca_file), "cert": (str(pki.client_cert), str(pki.client_key)), "timeout": 10}
    for path in ("/healthcheck", "/ping", "/no-such-route"):
        answer = requests.get(f"{https_server.url}{path}", **auth)
        assert answer.headers["Strict-Transport-Security"] == "max-age=63072000", path


def test_plain_http_is_not_served(https_server):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{https_server.port}/healthcheck", timeout=10)


def test_a_client_without_a_certificate_or_with_a_foreign_one_is_refused(https_server, pki):
    bare = ssl.create_default_context(cafile=str(pki.ca_file))
    assert ssl_refused(address(https_server), bare)
    assert ssl_refused(address(https_server), pki.client_context(pki.foreign_cert, pki.foreign_key))
    assert not ssl_refused(address(https_server), pki.client_context())  # the site's own client gets in


def test_a_tls11_client_is_refused(https_server, pki):
    assert "version" in ssl_refused(address(https_server), tls11_context(pki)).lower()


def sslyze_accepted(port: int, pki: Pki) -> dict[str, list[str]]:
    """The suites sslyze finds accepted on ``port`` per protocol version, scanning with the site client certificate."""
    from sslyze import (
        ClientAuthenticationCredentials,
        ScanCommand,
        Scanner,
        ServerNetworkConfiguration,
        ServerNetworkLocation,
        ServerScanRequest,
    )

    commands = {ScanCommand.SSL_2_0_CIPHER_SUITES, ScanCommand.SSL_3_0_CIPHER_SUITES,
                ScanCommand.TLS_1_0_CIPHER_SUITES, ScanCommand.TLS_1_1_CIPHER_SUITES,
                ScanCommand.TLS_1_2_CIPHER_SUITES, ScanCommand.TLS_1_3_CIPHER_SUITES}
    credentials = ClientAuthenticationCredentials(certificate_chain_path=pki.client_cert, key_path=pki.client_key)
    request = ServerScanRequest(server_location=ServerNetworkLocation("127.0.0.1", port),
                                network_configuration=ServerNetworkConfiguration(
                                    "127.0.0.1", tls_client_auth_credentials=credentials),
                                scan_commands=commands)
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = scanner.get_results()
    assert result.scan_result is not None, result.connectivity_error_trace
    accepted = {}
    for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        attempt = getattr(result.scan_result, f"{name}_cipher_suites")
        assert attempt.result is not None, (name, attempt.error_trace)
        accepted[name] = [suite.cipher_suite.name for suite in attempt.result.accepted_cipher_suites]
    return accepted


def test_sslyze_finds_no_version_below_12_and_no_suite_outside_the_list(https_server, pki):
    accepted = sslyze_accepted(https_server.port, pki)
    assert not any(accepted[name] for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")), accepted
    assert accepted["tls_1_2"] and accepted["tls_1_3"]
    outside = [s for s in accepted["tls_1_2"] if not (s.startswith(("TLS_ECDHE_", "TLS_DHE_"))
                                                      and ("_GCM_" in s or "CHACHA20_POLY1305" in s))]
    assert not outside, accepted["tls_1_2"]


def test_the_test_tool_runs_a_study_over_mutual_tls(https_server, pki, tmp_path, capsys):
    from tests.test_test_tool import run_tool

    study = tmp_path / "study"
    write_study(study, shape=(4, 16, 20))
    output = tmp_path / "out"
    assert run_tool("-i", study, "--host", "https://127.0.0.1", "--port", https_server.port, "-o", output,
                    "-c", "get-probability-mask", "--ca-file", pki.ca_file, "--cert", pki.client_cert,
                    "--key", pki.client_key) == 0, capsys.readouterr()
    assert "checked against the protocol and the study sent: OK" in capsys.readouterr().out
    assert run_tool("-i", study, "--host", "https://127.0.0.1", "--port", https_server.port, "-o", output,
                    "-c", "get-probability-mask", "--ca-file", pki.ca_file) == 1  # no client certificate
    assert "TLS with" in capsys.readouterr().err


def test_a_replaced_certificate_is_served_without_a_restart(https_server, pki):
    pid = https_server.process.pid
    _, _, before = negotiated(https_server, pki.client_context())
    new_cert, new_key = pki.issue("rotated")
    shutil.copy(new_key, https_server.key)
    shutil.copy(new_cert, https_server.cert)
    _, _, after = negotiated(https_server, pki.client_context())
    served = x509.load_pem_x509_certificate(new_cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert after != before and after == served
    assert https_server.process.pid == pid and https_server.process.poll() is None


# -- bad files stop the start, naming the setting and the file ----------------------------------------
def test_missing_unreadable_mismatched_and_expired_files_are_named(pki, tmp_path):
    def refusal(cert, key, ca=None) -> str:
        with pytest.raises(TLSConfigError) as caught:
            tls_files(cert, key, ca, "INFERENCE_TLS")
        return str(caught.value)

    missing = tmp_path / "absent.pem"
    assert refusal(missing, pki.server_key) == f"INFERENCE_TLS_CERT: {missing} does not exist"
    assert refusal(pki.server_cert, missing) == f"INFERENCE_TLS_KEY: {missing} does not exist"
    assert refusal(pki.server_cert, pki.server_key, missing) == f"INFERENCE_TLS_CLIENT_CA: {missing} does not exist"
    assert refusal(pki.server_cert, None).startswith("INFERENCE_TLS_CERT is set but INFERENCE_TLS_KEY is not")
    message = refusal(pki.server_cert, pki.client_key)
    assert message.startswith(f"INFERENCE_TLS_KEY: {pki.client_key} is not the private key of the certificate")
    not_pem = tmp_path / "text.pem"
    not_pem.write_text("hello\n")
    assert refusal(not_pem, pki.server_key).startswith(f"INFERENCE_TLS_CERT: {not_pem} is not a PEM certificate")
    unreadable = tmp_path / "folder.key"
    unreadable.mkdir()
    assert refusal(pki.server_cert, unreadable).startswith(f"INFERENCE_TLS_KEY: {unreadable} cannot be read")
    expired_cert, expired_key = pki.issue("expired", not_after=datetime.datetime(2024, 3, 1, 12, 0,
                                                                                   tzinfo=datetime.UTC))
    assert refusal(expired_cert, expired_key) == \
        f"INFERENCE_TLS_CERT: the certificate in {expired_cert} expired on 2024-03-01 12:00:00 UTC"
    assert tls_files(None, None, None, "INFERENCE_TLS") is None  # plain HTTP, as make serve runs


def test_gunicorn_does_not_start_with_a_mismatched_key(pki, tmp_path):
    env = {"INFERENCE_TLS_CERT": str(pki.server_cert), "INFERENCE_TLS_KEY": str(pki.client_key),
           "INFERENCE_PORT": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"HTTPS: INFERENCE_TLS_KEY: {pki.client_key} is not the private key" in done.stderr


def test_the_healthcheck_script_asks_over_https(https_server, pki):
    env = {"INFERENCE_PORT": str(https_server.port), "INFERENCE_HOST": "127.0.0.1",
           "INFERENCE_TLS_CERT": str(https_server.cert), "INFERENCE_TLS_KEY": str(https_server.key),
           "INFERENCE_TLS_CLIENT_CA": str(pki.ca_file), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "healthcheck.py"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
