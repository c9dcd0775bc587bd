"""The measurement store on each backend the docs promise: a SQLite file and a real PostgreSQL
server (tests/support/postgres.py). The same operations, the same answers."""

from __future__ import annotations

import datetime as dt
import multiprocessing

import pytest
from sqlalchemy import select, text

from planner.spec.errors import FieldError
from planner.store.database import Campaign, Experiment, Hardware, Model, Run, Store, fingerprint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _hardware(store: Store) -> Hardware:
    return store.get_or_create(Hardware, "h1", spec_name="cpu-host", kind="cpu", description="a host " * 60,
                               device_count=1, memory_gb=24.0, details={"cores": 2}, measurement=None)


def _model(store: Store, num_params: int = 70_553_706_496) -> Model:
    return store.get_or_create(Model, fingerprint({"params": num_params}), name="llama-70b",
                               path="/models/" + "x" * 2000, model_type="llama", num_params=num_params,
                               hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                               num_kv_heads=8, head_dim=128, vocab_size=128256, config={"rope_theta": 5e5})


def test_a_store_makes_its_tables_once_and_reopens(store_url):
    Store(store_url)
    store = Store(store_url)
    assert store.engine.dialect.name == store_url.split(":")[0]
    with store.session() as session:
        assert session.scalar(select(Run.id)) is None


def test_values_past_32_bits_and_long_text_round_trip(store_url):
    store = Store(store_url)
    model = _model(store)  # 70B parameters overflow a 32-bit integer column
    hardware = _hardware(store)
    again = Store(store_url)
    with again.session() as session:
        row = session.get(Model, model.id)
        assert row.num_params == 70_553_706_496 and len(row.path) == 2008
        assert row.config == {"rope_theta": 5e5}
        assert session.get(Hardware, hardware.id).details == {"cores": 2}


def test_get_or_create_returns_the_one_row(store_url):
    store = Store(store_url)
    first, second = _model(store), _model(store)
    assert first.id == second.id
    with store.session() as session:
        assert len(session.scalars(select(Model)).all()) == 1


def _open_and_make(url: str) -> int:
    store = Store(url)
    return _model(store).id


def test_processes_opening_a_new_store_at_once_share_its_tables_and_rows(store_url):
    # No tables yet: six processes create them and the same model row at the same moment.
    with multiprocessing.get_context("fork").Pool(6) as pool:
        ids = pool.map(_open_and_make, [store_url] * 6)
    assert len(set(ids)) == 1
    with Store(store_url).session() as session:
        assert len(session.scalars(select(Model)).all()) == 1


def test_a_column_added_since_the_store_was_made_is_added_to_it(store_url):
    store = Store(store_url)
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE runs DROP COLUMN delivery"))
    Store(store_url)  # an older store opened by newer code
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT count(delivery) FROM runs")).scalar() == 0


def test_times_come_back_as_the_instant_they_were(store_url):
    store = Store(store_url)
    hardware, model = _hardware(store), _model(store)
    when = dt.datetime(2026, 12, 7, 22, 30, tzinfo=dt.timezone.utc)
    from planner.store.database import EngineConfigRow, WorkloadRow

    config = store.get_or_create(EngineConfigRow, "c1", dtype="float32", quantization=None,
                                 tensor_parallel_size=1, data_parallel_size=1, max_num_seqs=8,
                                 max_num_batched_tokens=2048, enable_chunked_prefill=True,
                                 enable_prefix_caching=False, speculative_model=None,
                                 num_speculative_tokens=None, config={})
    workload = store.get_or_create(WorkloadRow, "w1", name="chat", description="", spec={})
    with store.session() as session:
        session.add(Run(hardware_id=hardware.id, model_id=model.id, engine_config_id=config.id,
                        workload_id=workload.id, load_kind="rate", load_value=1.0, started_at=when,
                        duration_s=1.0, num_requests=1, output_tokens=10, throughput_tok_s=10.0,
                        request_rate=1.0, latency={"ttft_p50": 0.01}, engine_version="0.1.0",
                        peak_memory_bytes=150 * 2**30))  # 150 GiB: past 32 bits
        session.commit()
    (run,) = Store(store_url).runs()
    started = run.started_at if run.started_at.tzinfo else run.started_at.replace(tzinfo=dt.timezone.utc)
    assert started == when and run.peak_memory_bytes == 150 * 2**30
    assert run.latency == {"ttft_p50": 0.01}


def test_claims_from_two_processes_take_each_experiment_once(store_url, model_dir, tmp_path):
    from support.mini_space import WORKLOAD, mini_space

    from planner.measure.profiler import plan_campaign

    store = Store(store_url)
    campaign = plan_campaign(store, model_dir, mini_space(tmp_path)[1], WORKLOAD)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        claimed = pool.starmap(_claim_all, [(store_url, campaign.id)] * 2)
    everything = [eid for part in claimed for eid in part]
    with store.session() as session:
        planned = session.scalars(select(Experiment.id).where(Experiment.campaign_id == campaign.id)).all()
        assert session.scalar(select(Campaign.id)) == campaign.id
    assert sorted(everything) == sorted(planned)  # each once, none left


def _claim_all(url: str, campaign_id: int) -> list[int]:
    from planner.measure.claims import claim_next

    store, taken = Store(url), []
    while (experiment := claim_next(store, campaign_id)) is not None:
        taken.append(experiment.id)
    return taken


def test_a_bad_url_is_refused_naming_the_field():
    with pytest.raises(FieldError) as caught:
        Store("postgresql://nobody@127.0.0.1:1/pilot")
    assert caught.value.field == "db" and "127.0.0.1" in str(caught.value)
    with pytest.raises(FieldError, match="no driver") as caught:
        Store("mysql://nobody@127.0.0.1:1/pilot")
    assert caught.value.field == "db"


def test_a_password_is_never_printed():
    store = Store.__new__(Store)
    from sqlalchemy import create_engine

    store.engine = create_engine("postgresql+psycopg://pilot:s3cret@db.example:5432/pilot")
    assert "s3cret" not in store.where and "db.example:5432/pilot" in store.where


def test_infinities_and_nan_in_json_come_back_as_floats(store_url):
    store = Store(store_url)
    details = {"edges": [float("inf"), -float("inf")], "none": float("nan"), "tag": {"$float": "x"}}
    hardware = store.get_or_create(Hardware, "h2", spec_name="cpu-host", kind="cpu", description="",
                                   device_count=1, memory_gb=1.0, details=details, measurement=None)
    with Store(store_url).session() as session:
        details = session.get(Hardware, hardware.id).details
    assert details["edges"] == [float("inf"), -float("inf")] and details["none"] != details["none"]
    assert details["tag"] == {"$float": "x"}  # not a number the store tagged: left alone


def test_a_running_claim_is_renewed_and_a_silent_one_from_another_host_is_taken_over(store_url, model_dir,
                                                                                    tmp_path):
    import time

    from support.mini_space import WORKLOAD, mini_space

    from planner.measure.claims import STALE_CLAIM, Heartbeat, claim_next
    from planner.measure.profiler import plan_campaign

    store = Store(store_url)
    campaign = plan_campaign(store, model_dir, mini_space(tmp_path)[1], WORKLOAD)
    mine = claim_next(store, campaign.id)

    def claimed_at(experiment_id: int) -> dt.datetime:
        with store.session() as session:
            when = session.get(Experiment, experiment_id).claimed_at
        return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)

    first = claimed_at(mine.id)
    with Heartbeat(store, mine.id, every_s=0.05):
        for _ in range(400):  # a count, not a deadline: the beat lands whatever the host's speed
            if claimed_at(mine.id) > first:
                break
            time.sleep(0.05)
    assert claimed_at(mine.id) > first
    # Another host's claim: kept while its heartbeat is recent, taken over once it is stale.
    with store.session() as session:
        other = session.scalars(select(Experiment).where(Experiment.campaign_id == campaign.id,
                                                         Experiment.status == "pending")).first()
        other_id = other.id
        session.execute(text("UPDATE experiments SET status='running', owner='elsewhere:1', claimed_at=:t "
                             "WHERE id=:i"), {"t": dt.datetime.now(dt.timezone.utc) - STALE_CLAIM / 2, "i": other_id})
        session.commit()
    taken = []
    while (experiment := claim_next(store, campaign.id)) is not None:
        taken.append(experiment.id)
    assert other_id not in taken  # its owner beat recently: still its own
    with store.session() as session:
        session.execute(text("UPDATE experiments SET claimed_at=:t WHERE id=:i"),
                        {"t": dt.datetime.now(dt.timezone.utc) - 2 * STALE_CLAIM, "i": other_id})
        session.commit()
    assert claim_next(store, campaign.id).id == other_id  # silent too long: taken over
