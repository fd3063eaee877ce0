"""Real PACS services for the tests and the benchmark: Debian's Orthanc and the DICOM node, on free ports.

``Orthanc`` runs ``Orthanc CONFIG.json`` with a config generated from the shipped
``deploy/orthanc/orthanc.json`` (storage in a temporary folder, free ports, the shipped
``autoroute.lua``, the node as modality ``hippoai``). ``DicomNodeProcess`` runs
``dicom_node.py`` as a subprocess. ``c_store`` sends files as a scanner would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE

from inference.config import PROJECT_ROOT
from inference.pacs.transport import NO_DELAY_HANDLERS

ORTHANC_CONFIG = PROJECT_ROOT / "deploy" / "orthanc" / "orthanc.json"
AUTOROUTE_LUA = PROJECT_ROOT / "deploy" / "orthanc" / "autoroute.lua"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (a reason to skip), or None."""
    if shutil.which("Orthanc") is None:
        return "needs Debian's orthanc package (apt-get install orthanc orthanc-dicomweb; .ci/run installs it)"
    if not DICOMWEB_PLUGIN.exists():
        return "needs Debian's orthanc-dicomweb package (apt-get install orthanc-dicomweb)"
    return None


def read_orthanc_json(path: Path) -> dict:
    """Orthanc's configuration file, which allows // comments, as a dict."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("//"))
    return json.loads(text)


class Orthanc:
    """Debian's Orthanc on free ports with the shipped configuration and Lua script."""

    def __init__(self, folder: Path, *, node_port: int, node_ae: str = "HIPPOAI", stable_age: int = 1,
                 dicom_port: int | None = None, no_delay: bool = True,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        self.aet = "ORTHANC"
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = read_orthanc_json(ORTHANC_CONFIG)
        config.update(
            StorageDirectory=str(self.folder / "db"), IndexDirectory=str(self.folder / "db"),
            HttpPort=self.http_port, DicomPort=self.dicom_port, RemoteAccessAllowed=False, StableAge=stable_age,
            LuaScripts=[str(AUTOROUTE_LUA)], Plugins=[str(DICOMWEB_PLUGIN)],
            DicomModalities={"hippoai": [node_ae, "127.0.0.1", node_port]})
        if tls is not None:  # DICOM TLS both ways (certificate, key, CA); the node's modality uses it too
            cert, key, ca = tls
            config.update(DicomTlsEnabled=True, DicomTlsCertificate=str(cert), DicomTlsPrivateKey=str(key),
                          DicomTlsTrustedCertificates=str(ca), DicomTlsRemoteCertificateRequired=True,
                          DicomModalities={"hippoai": {"AET": node_ae, "Host": "127.0.0.1", "Port": node_port,
                                                       "UseDicomTls": True}})
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = self.folder / "orthanc.log"
        self._log = open(self.log_path, "wb")
        # TCP_NODELAY=1: Orthanc's DICOM library (DCMTK) then switches Nagle's algorithm off, as docker-compose.yml does
        env = {**os.environ, "TCP_NODELAY": "1"} if no_delay else {k: v for k, v in os.environ.items()
                                                                     if k != "TCP_NODELAY"}
        self.process = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=self._log, env=env,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(60)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout}s; log: {self.log_path}")

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of a study, or None while it does not hold it."""
        response = requests.post(f"{self.url}/tools/lookup", data=study_uid, timeout=30)
        response.raise_for_status()
        return next((r["ID"] for r in response.json() if r["Type"] == "Study"), None)

    def series_of(self, study_uid: str) -> list[dict]:
        """The series of a study (Orthanc's expanded form), none while the study is absent."""
        study = self.study_id(study_uid)
        return self.get(f"/studies/{study}/series") if study else []

    def instance_file(self, series: dict) -> bytes:
        """The DICOM file of a single-instance series."""
        response = requests.get(f"{self.url}/instances/{series['Instances'][0]}/file", timeout=30)
        response.raise_for_status()
        return response.content

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class DicomNodeProcess:
    """``python dicom_node.py`` in a subprocess with its folders under ``folder``."""

    def __init__(self, folder: Path, *, port: int | None = None, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, ae_title: str = "HIPPOAI") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.log_path = self.folder / f"node-{self.port}.log"
        full_env = {**os.environ, "INFERENCE_PACS_ROOT": str(self.folder / "pacs"),
                    "INFERENCE_OUTPUT_ROOT": str(self.folder / "jobs"), "INFERENCE_PACS_HOST": "127.0.0.1",
                    **(env or {})}
        command = [sys.executable, "dicom_node.py", "--ae-title", ae_title, "--port", str(self.port), *args]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_for_log("listening on", 180)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float, *, count: int = 1) -> str:
        """Wait until ``pattern`` (a regular expression) appeared ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited ({self.process.returncode}):\n{text[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} in the node's log within {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def c_store(paths: Sequence[Path], host: str, port: int, called_ae: str, *, calling_ae: str = "SCANNER",
            abort_after: int | None = None, no_delay: bool = True, tls: ssl.SSLContext | None = None) -> int:
    """Send files by C-STORE over one association as ``calling_ae``; the number stored.

    With ``no_delay`` (default), Nagle's algorithm is off on the connection, as the node does
    (``inference/pacs/transport.py``); off, every instance waits for a delayed acknowledgement.

    With ``abort_after``, the association is aborted (not released) after that many files, as a
    sender that crashed would leave it. Raises ``ConnectionError`` when the association is refused.
    ``tls``: a client context for DICOM TLS (the server's certificate is verified for ``host``).
    """
    contexts = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in sorted(contexts):  # one context per syntax: each file goes as it is stored
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=NO_DELAY_HANDLERS if no_delay else None,
                         tls_args=None if tls is None else (tls, host))
    if not assoc.is_established:
        raise ConnectionError(f"{called_ae}@{host}:{port} refused the association from {calling_ae}")
    stored = 0
    for index, path in enumerate(paths):
        if abort_after is not None and index == abort_after:
            assoc.abort()
            return stored
        status = assoc.send_c_store(path)
        if status and int(status.Status) == 0:
            stored += 1
    assoc.release()
    return stored
