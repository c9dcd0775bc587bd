"""What serving adds: measured per request against the engine's own timings, fitted by batch
width, and replayed by the simulator onto the engine's steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from engine.scheduler import SchedulerConfig
from planner.costmodel.delivery import DeliveryModel
from planner.costmodel.simulator import SimRequest, Simulator
from planner.measure.delivery import KINDS, LEVELS, delivery_samples, summarize_delivery


def _constant(**delays: float) -> dict:
    """A served run's delivery record in which every delay of a kind is the same."""
    return {"levels": len(LEVELS), **{k: [delays.get(k, 0.0)] * len(LEVELS) for k in KINDS}}


@dataclass
class _Run:  # what DeliveryModel.fit reads of a fit_data.RunData
    delivery: dict | None
    mean_in_flight: float = 1.0
    steps: dict = field(default_factory=dict)


def _simulator(delivery: DeliveryModel | None = None) -> Simulator:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512)
    return Simulator(lambda c, peers: 0.01, config, num_kv_blocks=256, delivery=delivery)


def test_delays_are_measured_against_the_engines_own_timings():
    record = SimpleNamespace(response_id="cmpl-1", send_time=10.0, chunk_times=[10.5, 10.62, 10.64])
    merged = SimpleNamespace(response_id="cmpl-2", send_time=11.0, chunk_times=[11.3])  # 2 tokens, 1 chunk
    unknown = SimpleNamespace(response_id="cmpl-3", send_time=11.0, chunk_times=[11.3])
    engine = [{"id": "cmpl-1-0", "arrival_time": 10.002, "token_times": [10.4, 10.6, 10.61]},
              {"id": "cmpl-2-0", "arrival_time": 11.001, "token_times": [11.2, 11.25]}]
    samples = delivery_samples([record, merged, unknown], engine)
    np.testing.assert_allclose(samples["admit_s"], [0.002, 0.001], atol=1e-9)
    np.testing.assert_allclose(samples["first_s"], [0.1, 0.1], atol=1e-9)
    np.testing.assert_allclose(samples["token_s"], [0.02, 0.03], atol=1e-9)  # paired tokens only
    np.testing.assert_allclose(samples["gap_s"], [0.12 - 0.2, 0.02 - 0.01], atol=1e-9)
    summary = summarize_delivery(samples)
    assert summary["first_s_count"] == 2 and len(summary["gap_s"]) == len(LEVELS)
    assert summarize_delivery(delivery_samples([unknown], engine)) is None


def test_fitted_by_requests_in_flight_and_interpolated_between_bands():
    model = DeliveryModel().fit([_Run(_constant(admit_s=0.002), 1.0), _Run(_constant(admit_s=0.004), 1.3),
                                 _Run(_constant(admit_s=0.020), 16.0), _Run(None, 4.0)])
    assert model.num_runs == 3 and model.is_fitted
    assert model.quantiles("admit_s", 1)[50] == pytest.approx(0.003)  # both runs of band 0, averaged
    assert model.quantiles("admit_s", 4)[50] == pytest.approx(0.003 + 0.017 / 2)  # halfway in log2
    assert model.quantiles("admit_s", 64)[50] == pytest.approx(0.020)  # the widest band beyond it
    again = DeliveryModel.from_dict(model.to_dict())
    np.testing.assert_allclose(again.quantiles("admit_s", 4), model.quantiles("admit_s", 4))
    assert not DeliveryModel().fit([_Run(None)]).is_fitted


def test_the_simulator_replays_a_served_run_as_its_client_saw_it():
    request = [SimRequest(tuple(range(32)), 5)]
    engine = _simulator().run(request, concurrency=1).latencies[0]
    served = DeliveryModel().fit([_Run(_constant(admit_s=0.003, first_s=0.002, gap_s=0.001))])
    client = _simulator(served).run(request, concurrency=1).latencies[0]
    # The engine took it 3 ms after it was sent; its client read the first token 2 ms after it
    # was made, and every later gap 1 ms longer than the engine's.
    assert client.ttft_s == pytest.approx(engine.ttft_s + 0.005)
    assert client.itl_s == pytest.approx([g + 0.001 for g in engine.itl_s])
    assert client.e2e_s == pytest.approx(engine.e2e_s + 0.005 + 4 * 0.001)


def test_a_served_closed_loop_sends_the_next_request_once_the_last_token_was_read():
    requests = [SimRequest(tuple(range(1, 20)), 3), SimRequest(tuple(range(2, 21)), 3)]
    plain = _simulator().run(requests, concurrency=1)
    served = _simulator(DeliveryModel().fit([_Run(_constant(admit_s=0.004, token_s=0.005))])).run(
        requests, concurrency=1)
    # Each request: 4 ms to reach the engine; the next one leaves 5 ms after the last token.
    assert served.duration_s == pytest.approx(plain.duration_s + 0.004 + 0.005 + 0.004)
    assert served.latencies[1].ttft_s == pytest.approx(plain.latencies[1].ttft_s + 0.004)


def test_tokens_read_together_shrink_the_gap_but_never_reverse_it():
    gaps = DeliveryModel().fit([_Run(_constant(gap_s=-1.0))])
    client = _simulator(gaps).run([SimRequest(tuple(range(32)), 5)], concurrency=1).latencies[0]
    assert client.itl_s == [] and client.e2e_s == pytest.approx(client.ttft_s)  # all read at once
