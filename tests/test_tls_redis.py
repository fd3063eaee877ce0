"""Redis over TLS with an ACL user (a ``rediss://`` INFERENCE_BROKER_URL and INFERENCE_REDIS_TLS_*): a Celery job
runs through it (broker and job store), the user store reaches it, and clients without TLS, a client certificate
or the password are refused. redis-server from Debian, built with TLS."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from bench.job_backend import wait_for_redis
from inference.config import Settings
from inference.jobs.celery_backend import job_store
from inference.storage.backend import backend_for
from inference.tls import TLSConfigError
from inference.users import user_store
from tests.conftest import free_port, require, write_study
from tests.test_celery import CPU_ONLY, Cluster, job_client
from tests.tls_certs import Pki, make_pki

PASSWORD = "redis-Pass-for-tests-0123"


class TlsRedis:
    """redis-server on a TLS port only (no plain port), client certificates required, the default user off."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        require(None if shutil.which("redis-server") else "needs redis-server (Debian package redis-server)")
        self.port = free_port()
        config = folder / "redis.conf"
        config.write_text("\n".join([
            "port 0", f"tls-port {self.port}", "bind 127.0.0.1", 'save ""', "appendonly no", f"dir {folder}",
            f"tls-cert-file {pki.server_cert}", f"tls-key-file {pki.server_key}", f"tls-ca-cert-file {pki.ca_file}",
            "tls-auth-clients yes", 'tls-protocols "TLSv1.2 TLSv1.3"',
            "tls-ciphers ECDHE+AESGCM:DHE+AESGCM:ECDHE+CHACHA20:DHE+CHACHA20",
            "user default off", f"user inference on >{PASSWORD} ~* &* +@all"]) + "\n")
        self._log = open(folder / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(["redis-server", str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"rediss://inference:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.env = {"INFERENCE_BROKER_URL": self.url, "INFERENCE_REDIS_TLS_CA": str(pki.ca_file),
                    "INFERENCE_REDIS_TLS_CERT": str(pki.client_cert), "INFERENCE_REDIS_TLS_KEY": str(pki.client_key)}
        wait_for_redis(redis.Redis.from_url(self.settings().redis_url()), self.process,
                       f"TLS redis-server (log: {folder / f'redis-{self.port}.log'})")

    def settings(self, **changes) -> Settings:
        tls = {"broker_url": self.url, "redis_tls_ca": Path(self.env["INFERENCE_REDIS_TLS_CA"]),
               "redis_tls_cert": Path(self.env["INFERENCE_REDIS_TLS_CERT"]),
               "redis_tls_key": Path(self.env["INFERENCE_REDIS_TLS_KEY"])}
        return dataclasses.replace(Settings(), **{**tls, **changes})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(pki, tmp_path_factory):
    server = TlsRedis(tmp_path_factory.mktemp("redis"), pki)
    yield server
    server.stop()


def test_a_celery_job_runs_through_tls_redis(tls_redis, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "jobs").mkdir()
    env = {**tls_redis.env, "INFERENCE_JOB_BACKEND": "celery", "INFERENCE_DATA_ROOT": str(tmp_path / "data"),
           "INFERENCE_OUTPUT_ROOT": str(tmp_path / "jobs"), "INFERENCE_ENABLE_MOCKS": "1",
           "INFERENCE_JOB_TIME_LIMIT": "60", "INFERENCE_BROKER_VISIBILITY_TIMEOUT": "120",
           "INFERENCE_JOB_LEASE_SECONDS": "20"}
    cluster = Cluster(tmp_path, tls_redis, env)  # type: ignore[arg-type]  # stop() stops the workers, then this
    try:
        cluster.start_workers("tls", args=CPU_ONLY)
        settings = tls_redis.settings(job_backend="celery", data_root=tmp_path / "data",
                                      output_root=tmp_path / "jobs", job_time_limit=60, broker_visibility_timeout=120)
        write_study(tmp_path / "data" / "study", shape=(4, 16, 20))
        client = job_client(settings).test_client()
        submitted = client.post("/job/", json={"job_name": "3dblur", "in_dir": "study", "sigma_mm": 1.0})
        assert submitted.status_code == 201, submitted.get_json()
        uid = submitted.get_json()["uid"]
        deadline = time.monotonic() + 90
        while (answer := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer.status_code == 200, (answer.get_json(), cluster.workers[0].log()[-2000:])
        assert job_store(settings).get(uid).worker.startswith("tls@test")
    finally:
        for worker in cluster.workers:
            worker.stop()


def test_the_user_store_reaches_tls_redis(tls_redis):
    users = user_store(backend_for(tls_redis.settings(job_backend="celery")))
    assert users.any_users() is False


def test_plain_text_no_client_certificate_and_the_default_user_are_refused(tls_redis, pki):
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"redis://inference:{PASSWORD}@127.0.0.1:{tls_redis.port}/0",
                             socket_timeout=5).ping()
    no_cert = tls_redis.settings(redis_tls_cert=None, redis_tls_key=None)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(no_cert.redis_url(), socket_timeout=5).ping()
    default_user = tls_redis.settings(broker_url=f"rediss://127.0.0.1:{tls_redis.port}/0")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(default_user.redis_url(), socket_timeout=5).ping()
    foreign = tls_redis.settings(redis_tls_cert=pki.foreign_cert, redis_tls_key=pki.foreign_key)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(foreign.redis_url(), socket_timeout=5).ping()


def test_redis_tls_files_without_a_rediss_url_are_an_error(pki):
    settings = dataclasses.replace(Settings(), broker_url="redis://127.0.0.1:6379/0", redis_tls_ca=pki.ca_file)
    with pytest.raises(TLSConfigError, match="INFERENCE_BROKER_URL is not a rediss:// URL"):
        settings.redis_url()
    assert dataclasses.replace(Settings(), broker_url="redis://h:1/0").redis_url() == "redis://h:1/0"
