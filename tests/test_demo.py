"""Tests of the embedded demo (capture.demo): corpus, tokenizer, training, prepare_demo."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from capture.demo import DOMAINS, DemoConfig, build_corpus, prepare_demo  # noqa: E402

TINY = DemoConfig.tiny()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, prepare_demo(out, TINY, progress=False)


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _train_corpus(cfg: DemoConfig):
    return build_corpus(cfg.seed, cfg.train_chars_per_domain, cfg.eval_samples_per_domain, cfg.eval_max_chars)


# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_for_a_seed_and_varies_with_it():
    a = build_corpus(3, 8_000, 4, 300)
    b = build_corpus(3, 8_000, 4, 300)
    c = build_corpus(4, 8_000, 4, 300)
    assert a.train == b.train
    assert a.eval_samples == b.eval_samples
    assert a.train != c.train
    assert [s["text"] for s in a.eval_samples] != [s["text"] for s in c.eval_samples]


def test_held_out_samples_are_disjoint_from_training():
    corpus = build_corpus(0, 40_000, 6, 400)
    assert sorted(corpus.train) == sorted(DOMAINS)
    for d in DOMAINS:
        assert corpus.train[d], d
        # Different files / topics / generator streams ...
        assert not set(corpus.train_sources[d]) & set(corpus.eval_sources[d]), d
    # ... and no held-out text occurs verbatim in any training document.
    for s in corpus.eval_samples:
        for d in DOMAINS:
            assert not any(s["text"] in doc for doc in corpus.train[d]), (s["id"], d)
    # Documentation topics share paragraphs; held-out prose is unseen paragraph by paragraph.
    train_prose = "\x00".join(corpus.train["prose"])
    for s in corpus.eval_samples:
        if s["domain"] == "prose":
            assert not any(p in train_prose for p in s["text"].split("\n\n")), s["id"]
    counts = {d: sum(s["domain"] == d for s in corpus.eval_samples) for d in DOMAINS}
    assert counts == {d: 6 for d in DOMAINS}
    assert all(len(s["text"]) <= 400 for s in corpus.eval_samples)
    assert len({s["id"] for s in corpus.eval_samples}) == len(corpus.eval_samples)


def test_eval_jsonl_has_every_domain_held_out_and_fits_the_context(demo):
    out, manifest = demo
    (ds,) = manifest["datasets"]
    assert ds["name"] == "demo_eval" and Path(ds["path"]) == out / "data" / "eval.jsonl"
    rows = [json.loads(line) for line in Path(ds["path"]).read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "text", "domain"} and r["text"].strip() for r in rows)
    assert {d: sum(r["domain"] == d for r in rows) for d in DOMAINS} == {
        d: TINY.eval_samples_per_domain for d in DOMAINS
    }
    assert len({r["id"] for r in rows}) == len(rows)
    train = _train_corpus(TINY).train
    for r in rows:
        assert not any(r["text"] in doc for docs in train.values() for doc in docs), r["id"]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(manifest["tokenizer"], local_files_only=True)
    assert max(len(tok(r["text"])["input_ids"]) for r in rows) <= TINY.seq_len


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_offline_and_offsets_are_character_spans(demo):
    _, manifest = demo
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(manifest["tokenizer"], local_files_only=True)
    assert tok.is_fast
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "  def f(x):\n\treturn x  # naïve → ok\n\nThe café costs 3.50 € 日本語"
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert ids[0] == tok.bos_token_id and tuple(offsets[0]) == (0, 0)
    spans = [tuple(o) for o in offsets[1:]]
    assert all(s < e for s, e in spans)
    # Spans never go backwards; a multi-byte character split over tokens repeats its span.
    assert all(b[0] >= a[0] and (b[0] >= a[1] or b == a) for a, b in zip(spans, spans[1:]))
    distinct = list(dict.fromkeys(spans))
    # Untrimmed: the distinct spans tile the text exactly (leading spaces included).
    assert distinct[0][0] == 0 and distinct[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(distinct, distinct[1:]))
    for tid, (s, e) in zip(ids[1:], spans):
        piece = tok.decode([tid])
        if "\ufffd" not in piece:  # whole-character tokens decode to exactly their span
            assert piece == text[s:e], (piece, text[s:e])
    assert tok.decode(ids, skip_special_tokens=True) == text


# --------------------------------------------------------------------------- model


def test_checkpoints_are_safetensors_reload_offline_and_change(demo):
    _, manifest = demo
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [c["name"] for c in manifest["checkpoints"]]
    assert [c["step"] for c in manifest["checkpoints"]] == TINY.checkpoint_steps
    assert names == [f"step_{s:04d}" for s in TINY.checkpoint_steps]
    for c in manifest["checkpoints"]:
        path = Path(c["path"])
        assert path.is_absolute() and (path / "model.safetensors").is_file()
        pickles = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
        assert not pickles, pickles
        assert not list(path.parent.glob(".*tmp*")), "temporary checkpoint dirs left behind"
    first, last = Path(manifest["checkpoints"][0]["path"]), Path(manifest["checkpoints"][-1]["path"])
    # The file is readable without pickle and holds every weight of the model.
    n_file = sum(t.numel() for t in load_file(last / "model.safetensors").values())

    m0 = AutoModelForCausalLM.from_pretrained(first, local_files_only=True).eval()
    model = AutoModelForCausalLM.from_pretrained(last, local_files_only=True).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    assert n_file == sum(p.numel() for p in model.parameters())
    assert model.config.num_local_experts == TINY.num_experts
    assert model.config.num_experts_per_tok == TINY.top_k
    for layer0, layer1 in zip(m0.model.layers, model.model.layers, strict=True):
        assert not torch.equal(layer0.mlp.gate.weight, layer1.mlp.gate.weight)
        assert not torch.equal(layer0.mlp.experts.down_proj, layer1.mlp.experts.down_proj)

    tok = AutoTokenizer.from_pretrained(last, local_files_only=True)
    ids = tok("x = 1 + 2\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == TINY.num_layers
    assert tuple(out.router_logits[0].shape) == (ids.shape[1], TINY.num_experts)


def test_training_loss_decreases(demo):
    _, manifest = demo
    log = json.loads(Path(manifest["training_log"]).read_text())
    steps = log["steps"]
    assert [r["step"] for r in steps] == list(range(1, TINY.steps + 1))
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    # The balancing loss is Switch-normalised: top_k when perfectly balanced, more otherwise.
    assert all(r["aux_loss"] >= TINY.top_k * 0.95 for r in steps)
    nll = {c["step"]: c["eval_nll"] for c in log["checkpoints"]}
    assert sorted(nll) == TINY.checkpoint_steps
    assert all(nll[TINY.steps][d] < nll[0][d] for d in DOMAINS)


# --------------------------------------------------------------------------- prepare_demo


def test_manifest_layout(demo, tmp_path):
    out, manifest = demo
    from capture.demo import load_manifest

    assert load_manifest(out) == manifest
    assert load_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        load_manifest(tmp_path)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["config"] == TINY.to_dict()
    assert Path(manifest["tokenizer"]) == out / "tokenizer"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not list(out.glob(".*tmp*"))


def test_prepare_demo_is_idempotent(demo):
    out, manifest = demo
    before = _tree(out)
    again = prepare_demo(out, DemoConfig.tiny(), progress=False)
    assert again == manifest
    assert _tree(out) == before  # nothing rewritten, nothing added


def test_interrupted_or_changed_run_is_rebuilt(demo, tmp_path):
    src, manifest = demo
    out = tmp_path / "demo"
    shutil.copytree(src, out)
    # Simulate a run killed mid-training: no manifest, a missing checkpoint, a stale temp dir.
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "checkpoints" / manifest["checkpoints"][-1]["name"])
    (out / "checkpoints" / ".step_0012.tmp-999").mkdir()
    (out / ".manifest.json.tmp-999").write_text("{")
    # out_dir may hold other people's files: a rebuild removes only the demo's own.
    (out / "notes.txt").write_text("keep")
    (out / "data" / "mine.csv").write_text("keep")
    rebuilt = prepare_demo(out, TINY, progress=False)
    assert (out / "notes.txt").read_text() == (out / "data" / "mine.csv").read_text() == "keep"
    assert [c["name"] for c in rebuilt["checkpoints"]] == [c["name"] for c in manifest["checkpoints"]]
    assert all(Path(c["path"]).is_dir() for c in rebuilt["checkpoints"])
    assert not list(out.rglob(".*tmp*"))
    # Training is redone from scratch; seeding makes it reproduce the same weights.
    name = manifest["checkpoints"][-1]["name"]
    assert (out / "checkpoints" / name / "model.safetensors").read_bytes() == (
        src / "checkpoints" / name / "model.safetensors"
    ).read_bytes()

    # A different config invalidates the manifest.
    other = DemoConfig.tiny(steps=8, checkpoint_steps=[0, 8])
    changed = prepare_demo(out, other, progress=False)
    assert changed["config"] == other.to_dict()
    assert [c["step"] for c in changed["checkpoints"]] == [0, 8]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000", "step_0008"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint_steps": [50, 300]}, "must include 0"),
        ({"steps": 100}, "beyond steps=100"),
        ({"checkpoint_steps": [0, 50]}, "must include the final step"),
        ({"checkpoint_steps": [0, 150, 50, 300]}, "strictly increasing"),
        ({"top_k": 9}, "top_k=9 exceeds num_experts=8"),
        ({"batch_size": 10}, "multiple of the 4 domains"),
        ({"steps": "300"}, "steps must be int"),
        ({"lr": True}, "lr must be float"),
        ({"hidden_size": 60, "num_heads": 4}, "heads of even size"),
    ],
)
def test_bad_config_raises_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


def test_config_from_dict_and_defaults():
    import dataclasses

    # The experiment TOML is validated against these names and (real, unquoted) types.
    types = {f.name: f.type for f in dataclasses.fields(DemoConfig)}
    assert set(types.values()) <= {int, float, str, bool, list[int]}
    assert types["checkpoint_steps"] == list[int] and types["lr"] is float
    cfg = DemoConfig()
    assert 0 in cfg.checkpoint_steps and cfg.steps == cfg.checkpoint_steps[-1]
    assert DemoConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(DemoConfig.from_dict(cfg.to_dict())) == hash(cfg)
    assert DemoConfig.from_dict({"lr": 1}).lr == 1.0
    with pytest.raises(ValueError, match="unknown field"):
        DemoConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="cfg must be a DemoConfig"):
        prepare_demo(Path("/nonexistent"), {"steps": 3})  # type: ignore[arg-type]


def test_rebuild_keeps_a_users_own_step_folder(demo, tmp_path):
    """A step_* folder the trainer did not write (no SAVED_BY file) survives a rebuild."""
    from capture.demo.train import SAVED_BY

    src, manifest = demo
    out = tmp_path / "demo"
    shutil.copytree(src, out)
    (out / "manifest.json").unlink()
    mine = out / "checkpoints" / "step_9999"
    mine.mkdir()
    (mine / "weights.bin").write_bytes(b"user data")
    assert all((Path(out / "checkpoints" / c["name"]) / SAVED_BY).is_file() for c in manifest["checkpoints"])
    prepare_demo(out, TINY, progress=False)
    assert (mine / "weights.bin").read_bytes() == b"user data"
