"""The capture write path off the forward's critical path (issue 11, item 2).

``capture.stage.BackgroundWriter`` (bounded queue, one writer thread, errors
raised in the caller) and ``capture_model`` using it: the same arrays reach
the sink in the same order with or without the thread, a failing write stops
the capture with that error, leaves no hooks and never marks the checkpoint
complete. References are computed without the capture code: the model's own
``output_router_logits`` one sample at a time, and a brute-force cross-entropy.
"""

from __future__ import annotations

import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM

from capture.run import MemorySink, capture_model
from capture_helpers import seeded_tokens
from capture.stage import BackgroundWriter, stage_to_host
from storage import cube as cubes
from storage.schema import empty_routing

transformers.logging.set_verbosity_error()

VOCAB = 64
LENGTHS = [5, 9, 1, 12, 3, 7, 2, 11, 4]


@pytest.fixture(scope="module")
def model():
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, vocab_size=VOCAB,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    m = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random routers: distinct slot weights, no near-ties
        for name, p in m.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20.0)
    return m


def _tokens(lengths=LENGTHS, seed=0):
    return seeded_tokens(lengths, seed, low=0, high=VOCAB)


class ListSink(MemorySink):
    """Keeps copies of what it is given and the thread that gave it; ``fail_at``: raise at that batch."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(copy=True)
        self.fail_at = fail_at

    def append(self, **arrays):
        if self.fail_at is not None and len(self.parts) == self.fail_at:
            raise OSError(f"disk full at batch {self.fail_at}")
        super().append(**arrays)


def _hook_count(m):
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


# ---------------------------------------------------------------- BackgroundWriter


@pytest.mark.parametrize("threaded", [True, False])
def test_items_consumed_once_in_order(threaded):
    seen = []
    with BackgroundWriter(seen.append, threaded=threaded, depth=2) as w:
        for i in range(25):
            w.submit(i)
    assert seen == list(range(25))


def test_consume_runs_in_the_writer_thread_only_when_threaded():
    where = []
    for threaded in (True, False):
        with BackgroundWriter(lambda _: where.append(threading.current_thread()), threaded=threaded) as w:
            w.submit(0)
    assert where[0] is not threading.current_thread() and where[1] is threading.current_thread()


def test_writer_error_reaches_the_caller_and_stops_consuming():
    seen = []
    boom = OSError("no space left on device")

    def consume(i):
        if i == 3:
            raise boom
        seen.append(i)

    w = BackgroundWriter(consume, threaded=True, depth=1)
    with pytest.raises(OSError) as got:
        for i in range(1000):  # the error shows at a later submit (never blocks: the writer keeps draining)
            w.submit(i)
        w.close()
    assert got.value is boom  # the very exception, with the writer's traceback
    assert seen == [0, 1, 2]  # nothing after the failed item
    with pytest.raises(OSError):
        w.close()  # closing again still reports it
    assert w.error is boom


def test_error_raised_at_close_when_it_happens_last():
    def consume(i):
        if i == 2:
            raise ValueError("bad batch 2")

    w = BackgroundWriter(consume, threaded=True, depth=4)
    for i in range(3):
        w.submit(i)
    with pytest.raises(ValueError, match="bad batch 2"):
        w.close()


def test_queue_is_bounded():
    """With the consumer stuck, the producer gets ``depth`` items past the one being consumed, no more."""
    depth = 2
    gate, started = threading.Event(), threading.Event()
    seen, submitted = [], []

    def consume(i):
        started.set()
        gate.wait()
        seen.append(i)

    w = BackgroundWriter(consume, threaded=True, depth=depth)

    def produce():
        for i in range(10):
            w.submit(i)
            submitted.append(i)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert started.wait(30)
    for _ in range(6000):  # wait (up to a minute on a loaded host) until the producer has filled the queue
        if len(submitted) >= depth + 1:
            break
        time.sleep(0.01)
    time.sleep(0.2)  # were the queue unbounded, the producer would be done by now
    assert len(submitted) == depth + 1 and producer.is_alive()
    gate.set()
    producer.join(30)
    w.close()
    assert seen == list(range(10))


def test_abort_drops_queued_items_and_never_raises():
    gate = threading.Event()
    seen = []

    def consume(i):
        gate.wait()
        seen.append(i)

    w = BackgroundWriter(consume, threaded=True, depth=3)
    for i in range(3):
        w.submit(i)
    gate.set()
    w.abort()
    assert len(seen) <= 1  # at most the item already being consumed
    w.abort()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        w.submit(9)


def test_context_exit_by_exception_aborts():
    seen = []
    with pytest.raises(KeyError):
        with BackgroundWriter(seen.append, threaded=True, depth=1) as w:
            w.submit(1)
            raise KeyError("producer failed")
    assert seen in ([], [1])


def test_stage_to_host_on_cpu_is_a_view_without_event():
    t = {"a": torch.arange(6).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    staged = stage_to_host(t, meta="m")
    assert staged.event is None and staged.meta == "m"
    out = staged.numpy()
    np.testing.assert_array_equal(out["a"], np.arange(6).reshape(2, 3))
    assert out["b"].dtype == np.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_to_host_on_cuda_copies_to_pinned_memory():
    dev = torch.arange(1 << 20, device="cuda", dtype=torch.float32).reshape(16, -1)
    staged = stage_to_host({"x": dev * 2})
    assert staged.event and staged.host["x"].is_pinned()
    np.testing.assert_array_equal(staged.numpy()["x"], (np.arange(1 << 20, dtype=np.float32) * 2).reshape(16, -1))


# ---------------------------------------------------------------- capture_model


def _reference(model, tokens):
    """(ids, weights, logits, nll) from the model's own router logits, one unpadded sample at a time."""
    ids_all, w_all, lg_all, nll_all = [], [], [], []
    sample = tokens["sample"].values
    token_id = tokens["token_id"].values
    K = model.config.num_experts_per_tok
    with torch.no_grad():
        for s in np.unique(sample):
            x = torch.as_tensor(token_id[sample == s][None], dtype=torch.long)
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
            lg = torch.stack(out.router_logits)  # (layer, n, E)
            p = torch.softmax(lg.float(), dim=-1)
            w, i = torch.topk(p, K, dim=-1)  # Mixtral: top-k of the softmax, renormalised
            ids_all.append(i.numpy())
            w_all.append((w / w.sum(-1, keepdim=True)).numpy())
            lg_all.append(lg.numpy())
            logp = torch.log_softmax(out.logits[0].double(), dim=-1).numpy()
            n = x.shape[1]
            nll = np.full(n, np.nan)
            nll[:-1] = -logp[np.arange(n - 1), token_id[sample == s][1:]]
            nll_all.append(nll)
    return (np.concatenate(ids_all, 1), np.concatenate(w_all, 1), np.concatenate(lg_all, 1),
            np.concatenate(nll_all))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_background_capture_matches_the_model(model, batch_size):
    tokens = _tokens()
    sink = ListSink()
    capture_model(model, tokens, sink, keep_logits=True, keep_nll=True, batch_size=batch_size, progress=False,
                  background=True, queue_depth=1)
    assert all(t is not threading.current_thread() for t in sink.threads)
    got = sink.result()
    ids, w, lg, nll = _reference(model, tokens)
    T = tokens.sizes["token"]
    assert got["expert_ids"].shape == (3, T, 2) and got["expert_ids"].dtype == np.int16
    np.testing.assert_array_equal(got["expert_ids"], ids)
    np.testing.assert_allclose(got["expert_weights"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["router_logits"], lg.astype(np.float16), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert np.isnan(got["nll"][np.r_[np.diff(tokens["sample"].values) != 0, True]]).all()


def test_cpu_default_writes_inline_and_matches_background(model):
    tokens = _tokens(seed=1)
    inline, threaded = ListSink(), ListSink()
    capture_model(model, tokens, inline, keep_logits=True, batch_size=3, progress=False)  # CPU default: inline
    capture_model(model, tokens, threaded, keep_logits=True, batch_size=3, progress=False, background=True)
    assert all(t is threading.current_thread() for t in inline.threads)
    assert [p["expert_ids"].shape for p in inline.parts] == [p["expert_ids"].shape for p in threaded.parts]
    for k, v in inline.result().items():
        np.testing.assert_array_equal(threaded.result()[k], v, err_msg=k)


def test_pair_batches_reach_the_sink_in_token_order(model):
    """keep_js runs a later sample early; the writer thread holds it back until the ones before it are written."""
    tokens = _far_pairs([6, 3, 8, 5], seed=2)
    out = {}
    for background in (False, True):
        sink = ListSink()
        capture_model(model, tokens, sink, keep_lens=True, keep_js=True, batch_size=3, progress=False,
                      background=background)
        out[background] = sink
    assert sum(p["expert_ids"].shape[1] for p in out[True].parts) == tokens.sizes["token"]
    # batches [A0, B0], [A1, B1], ...: B0..B2 wait until A3 is written, then go in one append
    assert [p["expert_ids"].shape[1] for p in out[True].parts] == [6, 3, 8, 5 + 6 + 3 + 8 + 5]
    alone = ListSink()  # the A samples alone, in plain consecutive batches: their routing must be the same
    capture_model(model, _tokens([6, 3, 8, 5], seed=2).isel(token=slice(0, 22)), alone, batch_size=1,
                  keep_lens=True, progress=False)
    np.testing.assert_array_equal(out[True].result()["expert_ids"][:, :22], alone.result()["expert_ids"])
    for k, v in out[False].result().items():
        np.testing.assert_array_equal(out[True].result()[k], v, err_msg=k)
    js = out[True].result()["lens_js"]
    assert np.isfinite(js).any()


def _far_pairs(lengths, seed=0):
    """Samples A0..An-1 then B0..Bn-1, Ai aligned position by position with Bi: pair batches are not consecutive."""
    n = len(lengths)
    lens = list(lengths) * 2
    base = _tokens(lens, seed=seed)
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    aligned = np.full(base.sizes["token"], -1, dtype=np.int64)
    for i in range(n):
        a, b = starts[i] + np.arange(lens[i]), starts[i + n] + np.arange(lens[i])
        aligned[a], aligned[b] = b, a
    return base.assign_coords(aligned_token=("token", aligned))


def test_failed_write_stops_capture_removes_hooks_and_never_completes(model, tmp_path):
    tokens = _tokens()
    with torch.inference_mode():
        model(torch.zeros(1, 3, dtype=torch.long))  # transformers installs its own recorders on first call
    hooks = _hook_count(model)
    sink = ListSink(fail_at=1)
    with pytest.raises(OSError, match="disk full at batch 1"):
        capture_model(model, tokens, sink, batch_size=2, progress=False, background=True, queue_depth=1)
    assert len(sink.parts) == 1 and _hook_count(model) == hooks

    # The same through a real RoutingWriter: its second write fails; the region is never marked complete.
    path = tmp_path / "routing.zarr"
    template = empty_routing(tokens, checkpoints=["c"], steps=[0], layers=[0, 1, 2], num_experts=6, top_k=2,
                             keep_logits=True, token_chunk=8,
                             attrs={"model_family": "mixtral", "router_semantics": "softmax", "source": "test"})
    cubes.prepare_routing(path, template)

    class FailingWriter(cubes.RoutingWriter):
        calls = 0

        def append(self, **arrays):
            FailingWriter.calls += 1
            if FailingWriter.calls == 2:
                raise OSError("write failed: quota exceeded")
            super().append(**arrays)

    with pytest.raises(OSError, match="quota exceeded"):
        with FailingWriter(path, "c") as writer:
            capture_model(model, tokens, writer, keep_logits=True, batch_size=2, progress=False, background=True)
    assert cubes.completed_checkpoints(path) == [] and _hook_count(model) == hooks
    ds = cubes.open_routing(path, complete_only=False)
    assert int(ds["complete"].values[0]) == 0

    # and a capture that succeeds afterwards completes it
    with cubes.RoutingWriter(path, "c") as writer:
        capture_model(model, tokens, writer, keep_logits=True, batch_size=2, progress=False, background=True)
    assert cubes.completed_checkpoints(path) == ["c"]
    ids, _, lg, _ = _reference(model, tokens)
    ds = cubes.open_routing(path)
    np.testing.assert_array_equal(ds["expert_ids"].values[0], ids)
    np.testing.assert_allclose(ds["router_logits"].values[0], lg.astype(np.float16), rtol=2e-3, atol=2e-3)


def test_error_in_forward_leaves_no_thread_and_no_hooks(model):
    tokens = _tokens()
    hooks = _hook_count(model)
    threads = set(threading.enumerate())
    bad = tokens.assign_coords(token_id=("token", np.full(tokens.sizes["token"], VOCAB + 5)))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        capture_model(model, bad, ListSink(), progress=False, background=True)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    model.forward, original = broken_forward, model.forward
    try:
        with pytest.raises(RuntimeError, match="device-side assert"):
            capture_model(model, tokens, ListSink(), progress=False, background=True)
    finally:
        model.forward = original
    assert _hook_count(model) == hooks
    assert not [t for t in set(threading.enumerate()) - threads if t.name.startswith("capture-writer")]
