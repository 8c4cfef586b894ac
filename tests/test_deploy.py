"""Deployment artifacts, checked without a Docker engine: Dockerfile lint, compose/Prometheus/Grafana files,
dashboard queries against real metric names, and the presets."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def test_dockerfile_lints_clean_and_runs_press_as_non_root():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+runtime", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert re.search(r'^VOLUME \["/models"', text, re.M)
    assert re.search(r'^ENTRYPOINT \["press", "serve"\]$', text, re.M)


def test_compose_wires_press_prometheus_grafana():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert set(compose["services"]) == {"press", "prometheus", "grafana"}
    press = compose["services"]["press"]
    assert press["build"] == ".." and "8000:8000" in press["ports"]
    assert any(v.endswith(":/models:ro") for v in press["volumes"])
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["press:8000"]
    for mount in compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"]:
        assert (DOCKER / mount.split(":")[0]).exists(), mount
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/press.yaml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_is_generated_and_queries_real_metrics(server, tmp_path):
    committed = (DOCKER / "grafana/dashboards/press.json").read_text()
    subprocess.run([sys.executable, str(DOCKER / "build_dashboard.py")], check=True, capture_output=True)
    assert (DOCKER / "grafana/dashboards/press.json").read_text() == committed, "re-run docker/build_dashboard.py"
    dashboard = json.loads(committed)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("tokens/s", "first token", "first draft", "passes per canvas", "tokens per forward",
                   "batch size", "waiting"):  # fmt: skip
        assert wanted in titles
    httpx.post(server.base_url + "/v1/completions", json={"model": "tiny-random", "prompt": "x", "max_tokens": 4,
                                                          "denoising_steps": 2})  # fmt: skip
    exposed = set()
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        exposed.update(s.name for s in family.samples)
    used = {m for e in exprs for m in re.findall(r"press:[a-z0-9_]+", e)}
    assert used and used <= exposed, used - exposed


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load(preset):
    settings = load_settings(argparse.Namespace(config=str(preset)), environ={})
    assert settings.engine.model and settings.engine.max_num_seqs >= 1


def test_ray_serve_configs_build_the_press_application():
    """configs/ray/serve.yaml (Ray's `serve run`) and the KubeRay RayService name the same builder, and it builds
    the two deployments from their args."""
    pytest.importorskip("ray.serve")
    from server.ray_serve.app import app_builder

    local = yaml.safe_load((ROOT / "configs" / "ray" / "serve.yaml").read_text())
    service = yaml.safe_load((DOCKER / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (local, cluster):
        [app] = config["applications"]
        assert app["import_path"] == "server.ray_serve.app:app_builder" and app["route_prefix"] == "/"
    [worker] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    built = app_builder(dict(local["applications"][0]["args"]))
    assert type(built).__name__ == "Application"
    args = cluster["applications"][0]["args"]
    assert (ROOT / args["config"].removeprefix("/app/")).exists()  # the preset the cluster app names ships
