"""The engine's pure parts, without Ray: the scheduler's rules, request validation, the tiny model's files.

    .venv/bin/python -m pytest tests/serve/test_engine_units.py -q
"""

from __future__ import annotations

import itertools
import math

import pytest

from expertmesh.cluster.serve.scheduler import Limits, Scheduler
from expertmesh.cluster.serve.sequence import Kind, Sequence, State
from expertmesh.cluster.serve.tiny import write_tiny_model
from expertmesh.cluster.serve.tokenizer import Tokenizer, eos_token_ids
from expertmesh.cluster.serve.types import GenerateRequest, InvalidRequest, Prompt, Sampling, ScoreRequest
from expertmesh.cluster.serve.validate import ServedModel, check_generate, check_score
from expertmesh.workers.config import read_model_config
from expertmesh.workers.sampling import GREEDY

_arrivals = itertools.count()


def seq(prompt: int, generated: int = 0) -> Sequence:
    return Sequence(request_id=str(next(_arrivals)), kind=Kind.GENERATE, arrival=next(_arrivals),
                    tokens=[3] * (prompt + generated), prompt_len=prompt, max_new_tokens=64, sampling=GREEDY,
                    stop_ids=frozenset(), deadline=math.inf)


class Cluster:
    """A scheduler and a fake ledger: each step feeds its chunks and samples one token per finished prompt."""

    def __init__(self, workers=2, block_size=4, blocks=10, budget=8, max_running=8):
        self.lim = Limits(workers=workers, block_size=block_size, max_batch_tokens=budget, max_running=max_running)
        self.blocks = blocks
        self.sched = Scheduler(self.lim)
        self.ids = itertools.count()

    def used(self, w: int) -> int:
        return sum(self.lim.blocks_for(s.computed) for s in self.sched.running if s.home == w)

    def step(self):
        plan = self.sched.schedule([self.blocks - self.used(w) for w in range(self.lim.workers)],
                                   lambda: next(self.ids))
        for s, n in plan.chunks.items():
            s.computed += n
            if s.computed == len(s.tokens):
                s.tokens.append(5)
        assert all(self.used(w) <= self.blocks for w in range(self.lim.workers))  # never over budget
        return plan


def test_decodes_come_first_then_prompt_chunks_within_the_budget():
    c = Cluster(workers=1, blocks=100, budget=8)
    long, short = seq(20), seq(3)
    c.sched.add(long)
    plan = c.step()
    assert plan.chunks == {long: 8}  # the budget cuts the prompt into chunks
    c.sched.add(short)
    plan = c.step()
    assert plan.chunks == {long: 8}  # the running prompt's chunk comes before admissions
    plan = c.step()
    assert plan.chunks == {long: 4, short: 3}  # the rest of the budget admits the short one
    plan = c.step()
    assert list(plan.chunks.items()) == [(long, 1), (short, 1)]  # decodes


def test_admission_picks_the_worker_with_most_room_and_waits_in_order():
    c = Cluster(workers=2, blocks=10, budget=64)
    a, b, big, small = seq(30), seq(10), seq(30), seq(2)  # 30 + 1 tokens: 8 of the 10 blocks
    for s in (a, b, big, small):
        c.sched.add(s)
    plan = c.step()
    assert (a.home, b.home) == (0, 1)  # b goes where the room is
    assert big not in plan.chunks and small not in plan.chunks  # big fits nowhere yet; small waits behind it
    assert [s.state for s in (big, small)] == [State.WAITING] * 2


def test_preemption_takes_the_newest_sequence_of_the_home_and_the_oldest_always_advances():
    c = Cluster(workers=1, blocks=6, budget=64)  # 24 tokens of cache
    old, mid, new = seq(8), seq(4), seq(4)  # 3 + 2 + 2 blocks at admission (prompt + 1)
    for s in (old, mid, new):
        c.sched.add(s)
    c.step()
    assert [s.state for s in (old, mid, new)] == [State.RUNNING, State.RUNNING, State.WAITING]
    preempted = []
    while old.generated < 16:  # 8 + 16 tokens: every block of the worker
        plan = c.step()
        preempted += plan.preempted
        assert old in plan.chunks  # the oldest is never the one that waits
    assert preempted and preempted[0] is mid  # the newest running sequence of that worker went first
    assert mid.preemptions >= 1 and mid.computed <= len(mid.tokens)


def test_a_preempted_sequence_resumes_with_its_generated_tokens():
    c = Cluster(workers=1, blocks=4, budget=64)  # 16 tokens
    a, b = seq(5), seq(5)
    c.sched.add(a)
    c.sched.add(b)
    c.step()
    generated_before = None
    for _ in range(20):
        plan = c.step()
        if b in plan.preempted:
            generated_before = b.generated
            assert (b.computed, b.seq_id, b.state) == (0, None, State.WAITING)
            break
    assert generated_before is not None
    while b.state is not State.RUNNING:  # a finishes and leaves, b comes back
        if a.generated >= 10:
            c.sched.remove(a)
        c.step()
    assert b.generated == generated_before + 1  # its whole history was prefilled, then one token sampled


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ServedModel:
    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    return ServedModel("tiny", read_model_config(path).vocab_size, 64, Tokenizer.from_model_dir(path))


def test_the_tiny_model_has_a_tokenizer_of_its_vocabulary_and_an_eos(model, tmp_path):
    path = write_tiny_model(tmp_path / "t")
    assert eos_token_ids(path) == (1,)
    assert Tokenizer.from_model_dir(path).vocab_size == read_model_config(path).vocab_size
    text = "Grüße 🙂 experts"
    ids = model.tokenizer.encode(text)
    assert ids[0] == 0 and model.tokenizer.decode(ids) == text  # <s> added, skipped when decoding


BAD_GENERATE = [
    (dict(prompt=Prompt()), "prompt: expected exactly one of token_ids and text"),
    (dict(prompt=Prompt(token_ids=(1,), text="x")), "prompt: expected exactly one"),
    (dict(prompt=Prompt(token_ids=())), "prompt: expected at least one token"),
    (dict(prompt=Prompt(token_ids=(1, 10**6))), r"prompt.token_ids: token ids must lie in \[0, "),
    (dict(prompt=Prompt(token_ids=(1, 2.5))), "prompt.token_ids: expected a sequence of integer"),
    (dict(max_new_tokens=0), "max_new_tokens: expected an integer >= 1"),
    (dict(max_new_tokens=70), "max_new_tokens: the prompt's 2 tokens plus 70 exceed the context of 64"),
    (dict(sampling=Sampling(temperature=-1)), "sampling.temperature"),
    (dict(sampling=Sampling(top_k=-2)), "sampling.top_k"),
    (dict(sampling=Sampling(top_p=0)), "sampling.top_p"),
    (dict(sampling=Sampling(seed=-1)), "sampling.seed"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids: token ids must lie"),
    (dict(deadline_s=0), "deadline_s: expected a number of seconds > 0"),
    (dict(model="other"), "model: expected 'tiny'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_GENERATE, ids=[m.split(":")[0] for _, m in BAD_GENERATE])
def test_bad_requests_are_refused_naming_the_field(model, fields, message):
    request = GenerateRequest(**{"prompt": Prompt(token_ids=(1, 2)), **fields})
    with pytest.raises(InvalidRequest, match=message):
        check_generate(request, model)


def test_good_requests_pass_and_score_requests_are_checked(model):
    prompt, sampling, stop = check_generate(GenerateRequest(Prompt(text="Hello"), sampling=Sampling(0.5, 3, 0.9, 1),
                                                            stop_token_ids=(4,)), model)
    assert prompt == model.tokenizer.encode("Hello") and stop == {4}
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed) == (0.5, 3, 0.9, 1)
    p, c = check_score(ScoreRequest(Prompt(text="Hello"), Prompt(text=" world")), model)
    assert c == model.tokenizer.encode(" world", add_special_tokens=False)  # no <s> inside the text
    with pytest.raises(InvalidRequest, match="continuation: expected at least one token"):
        check_score(ScoreRequest(Prompt(text="Hello"), Prompt(token_ids=())), model)
    no_tokenizer = ServedModel("tiny", 100, 64, None)
    with pytest.raises(InvalidRequest, match="prompt.text: the model has no tokenizer.json"):
        check_generate(GenerateRequest(Prompt(text="Hello")), no_tokenizer)


def test_each_group_incarnation_records_routing_under_its_own_run(tmp_path):
    """The statistics sink of (replica, incarnation): the served model's shape, the configured Redis and
    model name, and a run of its own once a group was re-created (its windows never add into the old)."""
    from expertmesh.cluster.serve.config import EngineConfig
    from expertmesh.cluster.serve.engine import _sink_factory
    from expertmesh.workers.group_config import GroupConfig

    path = write_tiny_model(tmp_path / "m")
    cfg = read_model_config(path)
    group = GroupConfig(model=str(path), weights="random")
    assert _sink_factory(EngineConfig(group=group), "tiny", cfg)(0, 0) is None  # no Redis: nothing recorded
    config = EngineConfig(group=group, stats={"redis_url": "redis://127.0.0.1:6379/0", "run": "live"})
    make = _sink_factory(config, "tiny", cfg)
    first, again = make(0, 0), make(1, 2)
    assert (first.url, first.model, first.run, again.run) == ("redis://127.0.0.1:6379/0", "tiny", "live", "live.2")
    assert (first.num_layers, first.num_experts, first.top_k) == (2, 8, 2)


def test_routing_figures_follow_the_cost_models_rule():
    """2 GPUs, experts 0-1 on GPU 0 and 2-3 on GPU 1 (both layers): a token at home 0 routed to (0, 2) is
    sent to GPU 1 once; a token at home 1 routed to (2, 3) stays. Loads [1, 3]: balancedness 2/3."""
    import numpy as np

    from expertmesh.cluster.serve.routing_view import RoutingWindow
    from expertmesh.workers.plans import contiguous_plan

    window = RoutingWindow()
    window.add([np.array([[[0, 2], [0, 1]]]), np.array([[[2, 3], [2, 3]]])])  # worker 0's token, worker 1's
    balance, copies = window.figures(contiguous_plan(2, 4, 2))
    assert balance == pytest.approx([2 / 3, 1.0]) and copies == pytest.approx([0.5, 0.0])
    assert window.tokens == 2
    small = RoutingWindow(max_tokens=2)
    for _ in range(3):
        small.add([np.array([[[0, 2], [0, 1]]]), None])
    assert small.tokens == 2  # the oldest steps leave
    # Under the balanced rule each step is split by its own counts: expert 0 on both GPUs, 4 tokens of it from
    # GPU 0 per step: the fixed rule keeps all 4 at home (loads [4, 0]), the balanced one sends 2 ([2, 2]).
    from expertmesh.placement.plan import Placement

    shared = Placement(np.array([[0, 1, 0, 1]]), 2)
    hot = RoutingWindow()
    for _ in range(2):
        hot.add([np.zeros((4, 1, 1), dtype=np.int64), None])
    assert hot.figures(shared)[0] == pytest.approx([0.5])
    assert hot.figures(shared, "balanced") == ([1.0], [0.5])
