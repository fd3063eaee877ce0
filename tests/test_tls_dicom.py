"""DICOM TLS on the node (INFERENCE_PACS_TLS_*): its listener and its C-STORE destinations with mutual TLS, the
BCP 195 versions and suites (sslyze), handshakes out of pynetdicom's accept loop, and STOW-RS over HTTPS."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pynetdicom import AE, AllStoragePresentationContexts, evt
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from bench.pacs_services import c_store, free_port
from inference.pacs.outbox import DeliveryError, StowDestination
from inference.tls import TLSFiles, tls_files
from tests.conftest import PROJECT_ROOT, write_study
from tests.test_dicom_node import start_light_node
from tests.test_tls_gateway import sslyze_accepted
from tests.tls_certs import Pki, make_pki, ssl_refused, tls11_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def node_files(pki: Pki) -> TLSFiles:
    files = tls_files(pki.server_cert, pki.server_key, pki.ca_file, "INFERENCE_PACS_TLS")
    assert files is not None
    return files


class TlsStorageScp:
    """A C-STORE receiver with DICOM TLS requiring client certificates from the site CA (a PACS, as a test)."""

    def __init__(self, pki: Pki) -> None:
        self.received: list[pydicom.Dataset] = []
        self.versions: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="TLSPACS")
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event):
            self.received.append(event.dataset)
            self.versions.append(event.assoc.dul.socket.socket.version())
            return 0x0000

        context = node_files(pki).server_context()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=context,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def tls_pacs(pki):
    scp = TlsStorageScp(pki)
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def tls_node(pki, tls_pacs, tmp_path_factory):
    """A light node (mock rules) with DICOM TLS, sending its results to a TLS PACS."""
    env = {"INFERENCE_PACS_TLS_CERT": str(pki.server_cert), "INFERENCE_PACS_TLS_KEY": str(pki.server_key),
           "INFERENCE_PACS_TLS_CA": str(pki.ca_file)}
    node = start_light_node(tmp_path_factory.mktemp("tls-node"), "--destination",
                            f"TLSPACS@127.0.0.1:{tls_pacs.port}", env=env)
    yield node
    node.stop()


def negotiated(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.version(), tls.cipher()[0]


def test_a_trusted_caller_stores_over_tls_and_results_go_out_over_tls(tls_node, tls_pacs, pki, tmp_path):
    assert negotiated(tls_node.port, pki.client_context())[0] == "TLSv1.3"
    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = negotiated(tls_node.port, tls12)
    assert version == "TLSv1.2" and cipher.startswith(("ECDHE-RSA-", "DHE-RSA-")) and \
        ("GCM" in cipher or "CHACHA20" in cipher), cipher
    files = write_study(tmp_path / "study", description="Report me")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert c_store(files, "127.0.0.1", tls_node.port, tls_node.ae_title, tls=pki.client_context()) == len(files)
    tls_node.wait_for_log(r"association from SCANNER released: 8 instances stored", 20)
    deadline = time.monotonic() + 60  # the mock's secondary capture, sent to the TLS PACS with our certificate
    while time.monotonic() < deadline and not any(ds.StudyInstanceUID == study_uid for ds in tls_pacs.received):
        time.sleep(0.2)
    assert any(ds.StudyInstanceUID == study_uid for ds in tls_pacs.received), tls_node.log_text()[-3000:]
    assert set(tls_pacs.versions) == {"TLSv1.3"}
    assert "(DICOM TLS, client certificates required)" in tls_node.log_text()


def test_plain_no_certificate_foreign_ca_and_tls11_callers_are_refused(tls_node, pki, tmp_path):
    files = write_study(tmp_path / "study", description="Report me")[:1]
    with pytest.raises(ConnectionError):
        c_store(files, "127.0.0.1", tls_node.port, tls_node.ae_title)  # plain DICOM
    address = ("127.0.0.1", tls_node.port)
    assert ssl_refused(address, ssl.create_default_context(cafile=str(pki.ca_file)))
    assert ssl_refused(address, pki.client_context(pki.foreign_cert, pki.foreign_key))
    assert "version" in ssl_refused(address, tls11_context(pki)).lower()
    with pytest.raises(ConnectionError):
        c_store(files, "127.0.0.1", tls_node.port, tls_node.ae_title,
                tls=pki.client_context(pki.foreign_cert, pki.foreign_key))
    assert c_store(files, "127.0.0.1", tls_node.port, tls_node.ae_title, tls=pki.client_context()) == 1


def test_an_idle_tcp_connection_does_not_delay_another_association(tls_node, pki, tmp_path):
    files = write_study(tmp_path / "study", description="Report me")[:1]
    with socket.create_connection(("127.0.0.1", tls_node.port)):  # connected, sending nothing
        time.sleep(0.2)  # accepted by the node
        started = time.monotonic()
        assert c_store(files, "127.0.0.1", tls_node.port, tls_node.ae_title, tls=pki.client_context()) == 1
        assert time.monotonic() - started < 3


def test_sslyze_finds_no_version_below_12_and_no_suite_outside_the_list_on_the_node(tls_node, pki):
    accepted = sslyze_accepted(tls_node.port, pki)
    assert not any(accepted[name] for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")), accepted
    assert accepted["tls_1_2"] and accepted["tls_1_3"]
    outside = [s for s in accepted["tls_1_2"] if not (s.startswith(("TLS_ECDHE_RSA_", "TLS_DHE_RSA_"))
                                                      and ("_GCM_" in s or "CHACHA20_POLY1305" in s))]
    assert not outside, accepted["tls_1_2"]


def test_a_mismatched_key_stops_the_node_naming_the_setting(pki, tmp_path):
    done = subprocess.run([sys.executable, "dicom_node.py", "--root", str(tmp_path), "--tls-cert", str(pki.server_cert),
                           "--tls-key", str(pki.client_key)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert f"DICOM TLS: INFERENCE_PACS_TLS_KEY: {pki.client_key} is not the private key" in done.stderr


# -- STOW-RS over HTTPS, the server verified against INFERENCE_PACS_TLS_CA ------------------------------
@pytest.fixture
def https_stow(pki):
    """A DICOMweb STOW-RS receiver over HTTPS (client certificates required) that takes everything."""
    posted: list[bytes] = []

    @Request.application
    def app(request: Request) -> Response:
        posted.append(request.get_data())
        return Response('{"00081199": {"vr": "SQ", "Value": []}}', content_type="application/dicom+json")

    context = node_files(pki).server_context()
    server = make_server("127.0.0.1", 0, app, ssl_context=context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_port}/dicom-web", posted
    server.shutdown()


def test_stow_rs_goes_over_https_with_the_ca_and_our_certificate(https_stow, pki, tmp_path):
    url, posted = https_stow
    files = write_study(tmp_path / "study", shape=(1, 8, 8))
    assert StowDestination(url, node_files(pki).https_session()).send(files) == files
    assert len(posted) == 1 and posted[0].count(b"DICM") == 1
    with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        StowDestination(url).send(files)  # without the site CA the server is not trusted


def test_a_replaced_certificate_is_served_by_the_node_without_a_restart(pki, tmp_path):
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    env = {"INFERENCE_PACS_TLS_CERT": str(cert), "INFERENCE_PACS_TLS_KEY": str(key),
           "INFERENCE_PACS_TLS_CA": str(pki.ca_file)}
    node = start_light_node(tmp_path / "node", env=env)
    try:
        before = served_certificate(node.port, pki)
        new_cert, new_key = pki.issue("rotated-node")
        shutil.copy(new_key, key)
        shutil.copy(new_cert, cert)
        expected = x509.load_pem_x509_certificate(new_cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        deadline = time.monotonic() + 10  # the watcher looks every tenth of a second
        while (after := served_certificate(node.port, pki)) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert after != before and after == expected
        assert "DICOM TLS: certificate reloaded" in node.log_text()
        files = write_study(tmp_path / "study", description="Report me")[:1]
        assert c_store(files, "127.0.0.1", node.port, node.ae_title, tls=pki.client_context()) == 1
        assert node.process.poll() is None
    finally:
        node.stop()


def served_certificate(port: int, pki: Pki) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True)


def test_study1_goes_round_the_pacs_loop_over_dicom_tls_both_ways(pki, tmp_path):
    """A scanner sends Study1 to Orthanc over TLS; Orthanc routes it to the node over TLS (the node requires its
    certificate); the node's SEG, SR and Secondary Capture go back to Orthanc over TLS (Orthanc requires ours)."""
    from bench.pacs_services import DicomNodeProcess, Orthanc, orthanc_missing
    from tests.conftest import require, shared_data
    from tests.test_dicom_node import wait_for_results

    require(orthanc_missing())
    files = sorted(shared_data("studies", "Study1").rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc_cert, orthanc_key = pki.issue("orthanc")
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port, tls=(orthanc_cert, orthanc_key, pki.ca_file))
    try:
        env = {"INFERENCE_PACS_TLS_CERT": str(pki.server_cert), "INFERENCE_PACS_TLS_KEY": str(pki.server_key),
               "INFERENCE_PACS_TLS_CA": str(pki.ca_file)}
        node = DicomNodeProcess(tmp_path / "node", port=node_port, env=env, args=[
            "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--stable-seconds", "1",
            "--complete-on-release", orthanc.aet])
        try:
            with pytest.raises(ConnectionError):  # Orthanc's DICOM port takes no plain association
                c_store(files[:1], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
            assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet,
                           tls=pki.client_context()) == len(files)
            results = wait_for_results(orthanc, study_uid, 120)
            assert set(results) == {"SEG", "SR", "OT"}
            log = node.log_text()
            assert "association from ORTHANC released" in log and "(DICOM TLS, client certificates required)" in log
            version, cipher = negotiated(orthanc.dicom_port, pki.client_context())
            assert version in ("TLSv1.2", "TLSv1.3") and ("GCM" in cipher or "CHACHA20" in cipher), (version, cipher)
        finally:
            node.stop()
    finally:
        orthanc.stop()
