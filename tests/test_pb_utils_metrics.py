"""pb_utils.MetricFamily: a python model's custom metrics on the metrics endpoint (Triton's
custom metrics API), driven with tritonclient."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository import pb_utils
from modelport.repository import python_stub as stub

MODEL = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


def _err(fn):
    try:
        fn()
    except pb_utils.TritonModelException as e:
        return str(e)
    return "no error"


class TritonPythonModel:
    def initialize(self, args):
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.labels = labels
        self.cf = pb_utils.MetricFamily(
            name="pbm_requests", description="Values seen", kind=pb_utils.MetricFamily.COUNTER
        )
        self.gf = pb_utils.MetricFamily(
            name="pbm_last_sum", description="Sum of the last input", kind=pb_utils.MetricFamily.GAUGE
        )
        self.hf = pb_utils.MetricFamily(
            name="pbm_values", description="Values", kind=pb_utils.MetricFamily.HISTOGRAM
        )
        self.c = self.cf.Metric(labels=labels)
        self.g = self.gf.Metric(labels=labels)
        self.h = self.hf.Metric(labels=labels, buckets=[0.1, 1.0, 2.5])

    def misuse(self):
        errors = [
            _err(lambda: self.c.increment(-1.0)),
            _err(lambda: self.c.set(1.0)),
            _err(lambda: self.g.observe(1.0)),
            _err(lambda: self.h.value()),
            _err(lambda: self.h.increment(1.0)),
            _err(lambda: self.h.set(1.0)),
            _err(lambda: pb_utils.MetricFamily(
                name="pbm_requests", description="x", kind=pb_utils.MetricFamily.GAUGE)),
            _err(lambda: self.hf.Metric(labels={})),
            _err(lambda: self.hf.Metric(labels={}, buckets=[2.5, 0.1])),
            _err(lambda: self.hf.Metric(labels={}, buckets=[1, 1, 2])),
            _err(lambda: self.cf.Metric(labels={}, buckets=[1.0])),
            _err(lambda: self.cf.Metric(labels="model")),
        ]
        fam = pb_utils.MetricFamily(
            name="pbm_tmp", description="tmp", kind=pb_utils.MetricFamily.GAUGE
        )
        m = fam.Metric(labels={"a": "b"})
        m.set(5)
        del fam
        errors.append(_err(lambda: m.set(1.0)))
        # same name and kind: the same family (first description kept), same series
        again = pb_utils.MetricFamily(
            name="pbm_requests", description="another description",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        errors.append("shared=%g" % again.Metric(labels=self.labels).value())
        return errors

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy().astype(float)
            errors = self.misuse() if x.size == 0 else []
            for v in x:
                self.c.increment(1)
                self.h.observe(float(v))
            self.g.set(float(x.sum()))
            values = np.array([self.c.value(), self.g.value()], dtype=np.float64)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("VALUES", values),
                pb_utils.Tensor("ERRORS", np.array([json.dumps(errors).encode()], dtype=np.object_)),
            ]))
        return responses
"""

CONFIG = """
name: "pbm"
backend: "python"
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [
  { name: "VALUES" data_type: TYPE_FP64 dims: [ 2 ] },
  { name: "ERRORS" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [{ kind: KIND_CPU }]
"""

LABELS = 'model="pbm",version="1"'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pbm") / "models"
    (repo / "pbm" / "1").mkdir(parents=True)
    (repo / "pbm" / "config.pbtxt").write_text(CONFIG)
    (repo / "pbm" / "1" / "model.py").write_text(MODEL)
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=["pbm"]).start()
    yield srv
    srv.stop()


def scrape(srv) -> list[str]:
    return urllib.request.urlopen(srv.metrics_url).read().decode().splitlines()


def custom(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "pbm_" in ln]


def infer(client, module, x: list[float]):
    t = module.InferInput("X", [len(x)], "FP32")
    t.set_data_from_numpy(np.array(x, dtype=np.float32))
    r = client.infer("pbm", [t])
    return r.as_numpy("VALUES").tolist(), json.loads(r.as_numpy("ERRORS")[0])


def histogram(count: int, total: float, buckets: list[int]) -> list[str]:
    lines = [f"pbm_values_count{{{LABELS}}} {count}", f"pbm_values_sum{{{LABELS}}} {total:.16g}"]
    for le, n in zip(["0.1", "1", "2.5", "+Inf"], buckets):
        lines.append(f'pbm_values_bucket{{{LABELS},le="{le}"}} {n}')
    return lines


def families(counter: str, gauge: str, hist: list[str]) -> list[str]:
    return [
        "# HELP pbm_requests Values seen",
        "# TYPE pbm_requests counter",
        *([f"pbm_requests{{{LABELS}}} {counter}"] if counter else []),
        "# HELP pbm_last_sum Sum of the last input",
        "# TYPE pbm_last_sum gauge",
        *([f"pbm_last_sum{{{LABELS}}} {gauge}"] if gauge else []),
        "# HELP pbm_values Values",
        "# TYPE pbm_values histogram",
        *hist,
    ]


def test_counter_gauge_histogram_on_the_endpoint(server):
    assert custom(scrape(server)) == families("0", "0", histogram(0, 0.0, [0, 0, 0, 0]))
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    values, errors = infer(h, httpclient, [0.05, 1.5, 6.0])
    x1 = np.array([0.05, 1.5, 6.0], dtype=np.float32).astype(float)
    assert values == [3.0, float(x1.sum())] and errors == []  # value(): what the server holds
    values, _ = infer(g, grpcclient, [0.5])
    assert values == [4.0, 0.5]
    total = float(x1[0]) + float(x1[1]) + float(x1[2]) + 0.5
    lines = scrape(server)
    assert custom(lines) == families("4", "0.5", histogram(4, total, [1, 2, 3, 4]))
    assert any(ln.startswith('nv_inference_count{model="pbm",version="1"}') for ln in lines)


def test_many_operations_keep_their_order(server):
    h = httpclient.InferenceServerClient(server.http_url)
    before, _ = infer(h, httpclient, [2.0])
    values, _ = infer(h, httpclient, [3.0] * 1000)
    assert values == [before[0] + 1000, 3000.0]
    assert f"pbm_requests{{{LABELS}}} {before[0] + 1000:.16g}" in scrape(server)


def test_misuse_raises_tritons_errors(server):
    h = httpclient.InferenceServerClient(server.http_url)
    values, errors = infer(h, httpclient, [])
    assert errors == [
        "Failed to increment metric value: TRITONSERVER_METRIC_KIND_COUNTER can only be "
        "incremented monotonically by non-negative values.",
        "Failed to set metric value: TRITONSERVER_METRIC_KIND_COUNTER does not support Set",
        "Failed to observe metric value: TRITONSERVER_METRIC_KIND_GAUGE does not support Observe",
        "Failed to get metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Value",
        "Failed to increment metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support "
        "Increment",
        "Failed to set metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Set",
        "Error when creating MetricFamily: Family name already exists with different type",
        "Failed to create metric. Missing required buckets.",
        "Error when creating Metric: Bucket Boundaries must be strictly sorted",
        "Error when creating Metric: Bucket Boundaries must be strictly sorted",
        "Failed to create metric. Unexpected buckets found.",
        "Failed to create metric. Labels must be a dictionary.",
        "Failed to set metric value: Invalid metric operation as the corresponding "
        "'MetricFamily' has been deleted. The 'MetricFamily' object should be deleted AFTER "
        "its corresponding 'Metric' objects have been deleted.",
        f"shared={values[0]:g}",
    ]
    lines = custom(scrape(server))
    assert "# HELP pbm_requests Values seen" in lines  # the first description stays
    assert "# TYPE pbm_requests gauge" not in lines
    # the deleted family's series is gone; the second holder of pbm_requests let it go
    assert not [ln for ln in lines if ln.startswith("pbm_tmp{")]
    assert f"pbm_requests{{{LABELS}}} {values[0]:.16g}" in lines


def test_series_survive_reload_and_go_at_unload(server):
    h = httpclient.InferenceServerClient(server.http_url)
    before, _ = infer(h, httpclient, [1.0])
    h.load_model("pbm")  # reload: the new instance holds the series before the old one ends
    values, _ = infer(h, httpclient, [1.0])
    assert values[0] == before[0] + 1
    h.unload_model("pbm")
    lines = custom(scrape(server))
    assert "# TYPE pbm_requests counter" in lines  # families stay registered, as in Triton
    assert not [ln for ln in lines if not ln.startswith("#")]  # no series left
    h.load_model("pbm")
    values, _ = infer(h, httpclient, [1.0])
    assert values[0] == 1.0  # a fresh series


class _Conn:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)


def test_operations_are_batched_in_order(monkeypatch: pytest.MonkeyPatch):
    conn = _Conn()
    rt = stub._Runtime(conn)
    flush_s = stub.METRIC_FLUSH_S
    # the timer must not fire inside the loop (on a loaded box 100 calls can take > 5 ms)
    monkeypatch.setattr(stub, "METRIC_FLUSH_S", 60.0)
    for i in range(100):
        rt.metric_op(("increment", "f", (), float(i)))
    rt.send(stub.Ready(1))
    assert len(conn.sent) == 2 and isinstance(conn.sent[1], stub.Ready)
    assert [op[3] for op in conn.sent[0].ops] == [float(i) for i in range(100)]
    monkeypatch.setattr(stub, "METRIC_FLUSH_S", flush_s)
    rt.metric_op(("set", "f", (), 1.0))
    import time

    # queued alone: the flush timer sends it anyway (poll: a loaded box may start it late)
    deadline = time.monotonic() + 10
    while not isinstance(conn.sent[-1], stub.MetricOps) and time.monotonic() < deadline:
        time.sleep(flush_s)
    assert isinstance(conn.sent[-1], stub.MetricOps) and conn.sent[-1].ops[0][0] == "set"


def test_metric_family_outside_a_server():
    assert pb_utils.MetricFamily.COUNTER == 0 and pb_utils.MetricFamily.HISTOGRAM == 2
    with pytest.raises(pb_utils.TritonModelException, match="running modelport server"):
        pb_utils.MetricFamily("x", "y", pb_utils.MetricFamily.GAUGE)


CLASH = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        try:
            pb_utils.MetricFamily("nv_inference_count", "mine", pb_utils.MetricFamily.GAUGE)
            self.error = "no error"
        except pb_utils.TritonModelException as e:
            self.error = str(e)
        # the same kind: the built-in family itself, as in Triton (no reserved names there)
        self.fam = pb_utils.MetricFamily(
            "nv_inference_count", "mine", pb_utils.MetricFamily.COUNTER
        )
        self.own = self.fam.Metric(labels={"model": "clash", "version": "1"})
        self.other = self.fam.Metric(labels={"model": "elsewhere"})

    def execute(self, requests):
        self.own.increment(1000)
        self.other.increment(5)
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "E", np.array([self.error.encode()], dtype=np.object_))]) for _ in requests]
"""


def test_builtin_family_names_behave_as_in_triton(tmp_path):
    from modelport.entrypoints.kserve import metrics as kmetrics
    from modelport.repository import custom_metrics as cm

    kinds = {"counter": cm.COUNTER, "gauge": cm.GAUGE}
    assert {n: kinds[k] for n, k, _, _ in kmetrics._METRICS} == cm.BUILTIN_FAMILIES
    (tmp_path / "clash" / "1").mkdir(parents=True)
    (tmp_path / "clash" / "1" / "model.py").write_text(CLASH)
    (tmp_path / "clash" / "config.pbtxt").write_text(
        'backend: "python"\ninput [{ name: "X" data_type: TYPE_FP32 dims: [1] }]\n'
        'output [{ name: "E" data_type: TYPE_STRING dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU }]\n"
    )
    with EmbeddedServer([tmp_path], control_mode="explicit", load_models=["clash"]) as srv:
        h = httpclient.InferenceServerClient(srv.http_url)
        t = httpclient.InferInput("X", [1], "FP32")
        t.set_data_from_numpy(np.zeros(1, dtype=np.float32))
        error = h.infer("clash", [t]).as_numpy("E")[0].decode()
        assert error == (
            "Error when creating MetricFamily: Family name already exists with different type"
        )
        lines = scrape(srv)
    family = [
        ln
        for ln in lines
        if ln.startswith(
            ("nv_inference_count", "# HELP nv_inference_count", "# TYPE nv_inference_count")
        )
    ]
    assert family == [
        "# HELP nv_inference_count Number of inferences performed (does not include cached "
        "requests)",
        "# TYPE nv_inference_count counter",
        'nv_inference_count{model="clash",version="1"} 1001',  # 1 inference + the model's 1000
        'nv_inference_count{model="elsewhere"} 5',
    ]
