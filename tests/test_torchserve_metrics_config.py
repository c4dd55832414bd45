"""TorchServe's metrics configuration: metrics_mode (prometheus | log | legacy), metrics_config
(a metrics.yaml choosing frontend and handler metrics and their dimensions) and
model_metrics_auto_detect."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path

import httpx
from fastapi import FastAPI

from modelport.entrypoints.cli_serve import add_common_args
from modelport.entrypoints.torchserve import frontend
from modelport.torchserve.metrics_config import parse_metric_line

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

HANDLER = """
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes


class MetricHandler:
    def initialize(self, context):
        pass

    def handle(self, data, context):
        m = context.metrics
        m.add_metric("InferenceCount", 2, "Count", dimensions=[Dimension("Color", "blue")],
                     metric_type=MetricTypes.COUNTER)
        m.add_metric("SizeHist", 0.3, "Seconds", dimensions=[Dimension("Color", "blue")],
                     metric_type=MetricTypes.HISTOGRAM)
        m.add_metric("Undeclared", 5, "Count", dimensions=[], metric_type=MetricTypes.GAUGE)
        return ["ok"] * len(data)
"""

METRICS_YAML = """
dimensions:
  - &model_name "ModelName"
  - &level "Level"
ts_metrics:
  counter:
    - name: ts_inference_requests_total
      unit: Count
      dimensions: ["model_name", "model_version"]
    - name: Requests2XX
      unit: Count
      dimensions: [*level]
model_metrics:
  counter:
    - name: InferenceCount
      unit: Count
      dimensions: [Color, *model_name, *level]
  histogram:
    - name: SizeHist
      unit: Seconds
      dimensions: [Color, *model_name, *level]
"""


def _setup(tmp_path: Path, props: str) -> argparse.Namespace:
    handler = tmp_path / "metric_handler.py"
    handler.write_text(HANDLER)
    store = tmp_path / "store"
    ts_archives.archive(store, "m", handler)
    (tmp_path / "metrics.yaml").write_text(METRICS_YAML)
    cfg = tmp_path / "config.properties"
    cfg.write_text(f"model_store={store}\nload_models=m.mar\n{props}")
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    frontend.add_serve_args(parser)
    args = parser.parse_args(
        ["--ts-config", str(cfg), "--disable-token-auth", "--disable-grpc", "--ncs",
         "--management-port", "0", "--ts-workers", "1"]
    )  # fmt: skip
    args.serve_frontends = (frontend.__name__,)
    return args


def _run(args: argparse.Namespace, predictions: int = 2, versioned: int = 0) -> str:
    """Start, predict `predictions` times, `versioned` times naming version 1.0 (and once for
    a model that is not there), return the management port's /metrics."""

    async def main() -> str:
        app = FastAPI()
        service = await frontend.build(args, app)
        await service.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ts") as c:
                for _ in range(predictions):
                    r = await c.post("/predictions/m", content=b"x")
                    assert r.status_code == 200, r.text
                for _ in range(versioned):
                    r = await c.post("/predictions/m/1.0", content=b"x")
                    assert r.status_code == 200, r.text
                assert (await c.post("/predictions/nope", content=b"x")).status_code == 404
            base = f"http://127.0.0.1:{service.management_port}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                r = await c.get("/metrics")
            assert r.status_code == 200
            return r.text
        finally:
            await service.stop()

    return asyncio.run(main())


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[re.sub(r',?Hostname="[^"]*"', "", key)] = float(value)
    return out


def test_prometheus_mode_serves_what_metrics_yaml_declares(tmp_path):
    args = _setup(
        tmp_path, f"metrics_mode=prometheus\nmetrics_config={tmp_path / 'metrics.yaml'}\n"
    )
    text = _run(args, versioned=1)
    samples = _samples(text)
    # frontend metrics: only the declared ones, with the declared dimensions as labels; as
    # TorchServe's RestJob, a request that names no version counts under "default"
    assert samples['ts_inference_requests_total{model_name="m",model_version="default"}'] == 2.0
    assert samples['ts_inference_requests_total{model_name="m",model_version="1.0"}'] == 1.0
    assert samples['Requests2XX{Level="Host"}'] == 3.0
    assert "ts_inference_latency_microseconds" not in text and "Requests4XX" not in text
    assert "# TYPE ts_inference_requests_total counter" in text
    # the handler's metrics, with its dimensions (and Hostname)
    assert samples['InferenceCount{Color="blue",ModelName="m",Level="Model"}'] == 6.0
    assert re.search(r'InferenceCount\{[^}]*Hostname="[^"]+"\} 6\.0', text)
    assert samples['SizeHist_count{Color="blue",ModelName="m",Level="Model"}'] == 3.0
    assert samples['SizeHist_bucket{Color="blue",ModelName="m",Level="Model",le="0.5"}'] == 3.0
    assert samples['SizeHist_bucket{Color="blue",ModelName="m",Level="Model",le="0.25"}'] == 0
    assert "# TYPE SizeHist histogram" in text
    assert "Undeclared" not in text and "PredictionTime" not in text


def test_auto_detect_lets_undeclared_handler_metrics_through(tmp_path):
    args = _setup(
        tmp_path,
        "metrics_mode=prometheus\nmodel_metrics_auto_detect=true\n"
        f"metrics_config={tmp_path / 'metrics.yaml'}\n",
    )
    samples = _samples(_run(args, predictions=1))
    assert samples['Undeclared{ModelName="m",Level="Model"}'] == 5.0
    assert samples['InferenceCount{Color="blue",ModelName="m",Level="Model"}'] == 2.0


def test_log_mode_writes_the_metrics_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("METRICS_LOCATION", str(tmp_path / "mlogs"))
    args = _setup(tmp_path, f"metrics_mode=log\nmetrics_config={tmp_path / 'metrics.yaml'}\n")
    assert _run(args, predictions=1) == ""  # nothing for /metrics in log mode
    ts_log = (tmp_path / "mlogs" / "ts_metrics.log").read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3} - "
    assert any(
        re.match(stamp + r"ts_inference_requests_total\.Count:1\.0\|#model_name:m,"
                 r"model_version:default\|#hostname:[^,]+,timestamp:\d+$", line)
        for line in ts_log
    ), ts_log  # fmt: skip
    assert any(re.match(stamp + r"Requests2XX\.Count:1\.0\|#Level:Host\|", ln) for ln in ts_log)
    model_log = (tmp_path / "mlogs" / "model_metrics.log").read_text().splitlines()
    (line,) = [ln for ln in model_log if " - InferenceCount." in ln]
    assert re.match(
        stamp + r"InferenceCount\.Count:2\.0\|#Color:blue,ModelName:m,Level:Model\|"
        r"#hostname:[^,]+,requestID:\w+,timestamp:\d+$",
        line,
    ), line
    assert not any("Undeclared" in ln for ln in model_log)


def test_legacy_mode_keeps_the_three_inference_series(tmp_path):
    args = _setup(tmp_path, f"metrics_mode=legacy\nmetrics_config={tmp_path / 'metrics.yaml'}\n")
    samples = _samples(_run(args, predictions=1, versioned=1))
    assert set(samples) == {
        f'{n}{{model_name="m",model_version="{v}"}}'
        for n in ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                  "ts_queue_latency_microseconds")
        for v in ("default", "1.0")
    }  # fmt: skip


def test_backend_metric_line():
    m = parse_metric_line(
        "[METRICS]PredictionTime.ms:12.5|#ModelName:m,Level:Model|#type:GAUGE|"
        "#hostname:box,1700000000,req-1"
    )
    assert m is not None
    assert (m.name, m.unit, m.value, m.type) == ("PredictionTime", "ms", 12.5, "gauge")
    assert (m.dimensions, m.hostname, m.request_id) == ({"ModelName": "m", "Level": "Model"},
                                                       "box", "req-1")  # fmt: skip
