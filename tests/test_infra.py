"""infra/compose.yaml and the worker images are consistent with the project: services wired to each other,
the GPU reserved for the CUDA worker, pools and deployments matching deployments/prefect.yaml, images pinned to the
versions constraints.txt pins, every file a Dockerfile copies present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def _pin(name: str) -> str:
    return re.search(rf"^{name}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)


def test_services_and_their_dependencies_exist(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "setup", "worker-cpu", "worker-cuda"} <= set(services)
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully", "service_started")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} is waited on as healthy but has no healthcheck"
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0]
            assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


def test_server_uses_postgresql_and_workers_reach_the_server(compose):
    server = compose["services"]["prefect-server"]
    assert server["image"] == f"prefecthq/prefect:{_pin('prefect')}-python3.11"
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://prefect:") and url.endswith("@postgres:5432/prefect")
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == "prefect"
    for worker in ("worker-cpu", "worker-cuda"):
        env = compose["services"][worker]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["HF_TOKEN"] == "${HF_TOKEN:-}"  # from the environment, never a literal


def test_cuda_worker_reserves_a_gpu_and_workers_poll_the_pools_prefect_yaml_defines(compose, prefect_yaml):
    devices = compose["services"]["worker-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["worker-cpu"]
    pools = {p["name"] for p in prefect_yaml["definitions"]["work_pools"].values()}
    assert pools == {"cpu", "cuda", "apple"}
    for worker, pool in (("worker-cpu", "cpu"), ("worker-cuda", "cuda")):
        cmd = compose["services"][worker]["command"]
        assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == pool
    setup = " ".join(compose["services"]["setup"]["command"])
    assert "for pool in cpu cuda apple" in setup and "--prefect-file deployments/prefect.yaml" in setup


def test_prefect_yaml_deploys_both_flows_with_the_nightly_cron(prefect_yaml):
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert {"quantize-model", "nightly", "quantize-method-cpu", "quantize-method-cuda",
            "quantize-method-apple"} <= set(deployments)
    assert deployments["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert f"def {func}(" in (ROOT / path).read_text()
    from turboquant.pipeline.placement import METHOD_DEPLOYMENT, POOL_FOR_DEVICE

    for pool in POOL_FOR_DEVICE.values():
        flow_name, name = METHOD_DEPLOYMENT.format(pool=pool).split("/")
        assert deployments[name]["work_pool"]["name"] == pool and flow_name == "quantize_method"
    assert (ROOT / deployments["nightly"]["parameters"]["watch"]).is_file()


@pytest.mark.parametrize("dockerfile", ["worker-cpu.Dockerfile", "worker-cuda.Dockerfile"])
def test_worker_images_copy_existing_files_and_pin_torch(dockerfile):
    text = (INFRA / dockerfile).read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{dockerfile} copies missing {src}"
    assert f"torch=={_pin('torch')}" in text and "-c constraints.txt" in text


def test_compose_file_is_valid_for_docker_compose():
    """`docker compose config` when the compose plugin is installed (not on the CI machines)."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here; the structural checks above still ran")
    res = subprocess.run([docker, "compose", "-f", str(INFRA / "compose.yaml"), "config", "-q"],
                         capture_output=True, text=True, env={"POSTGRES_PASSWORD": "x", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
