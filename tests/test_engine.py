"""The continuous-batching engine: each sequence gets the tokens it gets alone, whoever it shares
the batch with and whenever it joins or leaves."""

import functools
import threading

import pytest
import torch

from gpt.config import build_config
from gpt.inference.engine import Engine, QueueFull, Sequence
from gpt.inference.sample import decode, pick_tokens, seeded_generator
from gpt.model import GPT

VOCAB, CONTEXT = 30, 32


def tiny(pos: str) -> GPT:
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "vocab_size": VOCAB, "block_size": CONTEXT,
                                     "pos_encoding": pos}}).model
    return GPT(config).eval()


def alone(model: GPT, prompt: list[int], steps: int, temperature: float, seed: int) -> list[int]:
    """What `gpt sample` draws for the prompt: its decode loop, one sequence, its own generator."""
    pick = functools.partial(pick_tokens, temperature=temperature, top_k=None, top_p=1.0,
                             generator=seeded_generator(torch.device("cpu"), seed), vocab_size=VOCAB)
    return [int(t) for t in decode(model, torch.tensor([prompt]), steps, pick)]


class Recorder:
    """Sequences whose tokens and end reasons are kept; `stop_after` ends one early (as a stop string would)."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.ends: dict[int, str] = {}

    def sequence(self, key: int, prompt: list[int], max_tokens: int, stop_after: int | None = None,
                 temperature: float = 0.0, **kw) -> Sequence:
        self.tokens[key] = []

        def on_token(token) -> bool:
            self.tokens[key].append(token.id)
            return stop_after is not None and len(self.tokens[key]) >= stop_after

        return Sequence(prompt, max_tokens, on_token, lambda reason: self.ends.__setitem__(key, reason),
                        temperature=temperature, **kw)


def run_until_idle(engine: Engine, limit: int = 500) -> None:
    with torch.inference_mode():
        for _ in range(limit):
            if not engine.busy():
                return
            engine.step()
    raise AssertionError("the engine did not finish")


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16], [3] * 12, [7, 1], [2] * 10]
MAX_TOKENS = [10, 20, 5, 25, 8, 30, 40]  # the last one fills the context (10 + 40 > 32)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_sequences_joining_and_leaving_get_their_solo_tokens(pos, temperature):
    model = tiny(pos)
    engine = Engine(model, VOCAB, max_batch=3, max_queue=10)
    record = Recorder()
    sequences = [record.sequence(i, p, m, temperature=temperature, seed=100 + i)
                 for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    engine.submit(sequences[:2])
    with torch.inference_mode():
        engine.step()
        engine.step()
    engine.submit(sequences[2:])  # join a running batch; the batch of 3 makes the rest wait for rows
    run_until_idle(engine)
    for i, (prompt, max_tokens) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        room = CONTEXT - len(prompt) + 1  # the last token drawn needs no place in the cache
        assert record.tokens[i] == alone(model, prompt, min(max_tokens, room), temperature, 100 + i), i
        assert record.ends[i] == "length"
    assert engine.cache.lengths == [0, 0, 0] and not engine.running


def test_a_sequence_that_ends_early_frees_its_row_for_a_waiting_one():
    model = tiny("rope")
    engine = Engine(model, VOCAB, max_batch=2)
    record = Recorder()
    engine.submit([record.sequence(0, [1, 2], 20), record.sequence(1, [3], 3, stop_after=2),
                   record.sequence(2, [4, 5, 6], 6)])
    with torch.inference_mode():
        engine.step()  # 0 and 1 join and draw two tokens each (prefill, then a step): 1 is done
        assert record.ends == {1: "stop"} and len(engine.running) == 1 and len(engine.waiting) == 1
        engine.step()
        assert len(engine.running) == 2 and not engine.waiting
    run_until_idle(engine)
    assert record.ends == {0: "length", 1: "stop", 2: "length"}
    assert len(record.tokens[1]) == 2
    assert record.tokens[0] == alone(model, [1, 2], 20, 0.0, 0)
    assert record.tokens[2] == alone(model, [4, 5, 6], 6, 0.0, 0)


def test_cancelled_sequences_leave_at_the_next_step():
    engine = Engine(tiny("learned"), VOCAB, max_batch=2)
    record = Recorder()
    running, waiting = record.sequence(0, [1], 25), record.sequence(1, [2], 25)
    engine.submit([running])
    with torch.inference_mode():
        engine.step()
    engine.submit([waiting])
    engine.cancel([running, waiting])
    with torch.inference_mode():
        engine.step()
    assert record.ends == {0: "cancelled", 1: "cancelled"} and not engine.busy()
    assert len(record.tokens[0]) == 2 and record.tokens[1] == []


def test_a_failing_forward_ends_its_sequences_with_error_and_the_engine_goes_on():
    model = tiny("learned")
    engine = Engine(model, VOCAB, max_batch=2)
    record = Recorder()
    real = model.hidden_states
    model.hidden_states = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    engine.submit([record.sequence(0, [1, 2], 5)])
    run_until_idle(engine)
    assert record.ends == {0: "error"}
    model.hidden_states = real
    engine.submit([record.sequence(1, [1, 2], 5)])
    run_until_idle(engine)
    assert record.ends[1] == "length" and record.tokens[1] == alone(model, [1, 2], 5, 0.0, 0)


def test_the_queue_is_bounded_and_refuses_prompts_it_cannot_run():
    engine = Engine(tiny("learned"), VOCAB, max_batch=1, max_queue=2)
    record = Recorder()
    engine.submit([record.sequence(0, [1], 5), record.sequence(1, [1], 5)])
    with pytest.raises(QueueFull):
        engine.submit([record.sequence(2, [1], 5)])
    with pytest.raises(ValueError, match="prompt needs 1 to 32 tokens"):
        engine.submit([record.sequence(3, [1] * 33, 5)])
    engine.stop()
    engine.run()  # returns at once, ending what waits
    assert record.ends == {0: "cancelled", 1: "cancelled"}


def test_logprobs_are_the_models_before_temperature():
    model = tiny("rope")
    engine = Engine(model, VOCAB)
    seen = []
    sequence = Sequence([1, 2, 3], 1, lambda token: seen.append(token) or False, lambda reason: None,
                        temperature=0.7, seed=1, logprobs=3, prompt_logprobs=True)
    engine.submit([sequence])
    run_until_idle(engine)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([[1, 2, 3]]))[0][0], dim=-1)
    token = seen[0]
    assert token.logprob == pytest.approx(expected[-1, token.id].item(), abs=1e-5)
    assert [i for i, _ in token.top] == expected[-1].topk(3).indices.tolist()
    assert [t.id for t in sequence.prompt_tokens] == [2, 3]
    assert sequence.prompt_tokens[0].logprob == pytest.approx(expected[0, 2].item(), abs=1e-5)


def test_the_engine_decodes_with_the_threads_it_was_given_on_its_own_thread():
    seen, done = [], threading.Event()
    engine = Engine(tiny("learned"), VOCAB, threads=1)
    assert Engine(tiny("learned"), VOCAB).threads == torch.get_num_threads()  # by default: where it is made
    sequence = Sequence(prompt=[1, 2], max_tokens=3, on_token=lambda token: seen.append(torch.get_num_threads()),
                        on_end=lambda reason: done.set())
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    engine.submit([sequence])
    assert done.wait(30)
    engine.stop()
    thread.join(30)
    assert seen == [1, 1, 1]
