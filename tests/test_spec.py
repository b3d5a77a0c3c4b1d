"""The experiment file is validated up front with messages naming file and key."""

import pytest

from experiments.spec import SpecError, load_experiment
from spec_helpers import MINIMAL


def _write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = MINIMAL + """
[capture]
keep_router_logits = true
"""


def test_demo_spec_loads():
    exp = load_experiment("experiments/demo.toml")
    assert exp.model.source == "demo" and exp.capture.keep_router_logits
    assert exp.analyses.run


def test_good_spec(tmp_path):
    exp = load_experiment(_write(tmp_path, GOOD))
    assert exp.model.checkpoints[0].name == "a" and exp.datasets[0].text_field == "text"
    assert exp.dask.host == "127.0.0.1" and exp.model.trust_remote_code is False


@pytest.mark.parametrize(
    "text, key, expected",
    [
        (GOOD + "\nbogus = 1\n", "bogus", "unknown key"),
        (GOOD.replace("keep_router_logits = true", "keep_router_logits = 'yes'"), "capture.keep_router_logits",
         "true or false"),
        (GOOD.replace('output_dir = "runs/x"\n', ""), "output_dir", "missing required key"),
        (GOOD.replace("step = 0", 'step = "zero"'), "model.checkpoints[0].step", "an integer"),
        (GOOD.replace("[capture]", "[capture]\nbatchsize = 3"), "capture.batchsize", "unknown key"),
        (GOOD + "\n[analyses]\nrun = ['nope']\n", "analyses.run", "unknown analysis"),
        (GOOD.replace('source = "checkpoints"', 'source = "hub"'), "model.source", "'demo', 'checkpoints' or 'import'"),
        (GOOD + "\n[model.demo]\nsteps = 3\n", "model.demo", "only allowed"),
        ('name = "x"\noutput_dir = "o"\n[model.demo]\nbogus = 1\n', "model.demo.bogus", "unknown key"),
        ('name = "x"\noutput_dir = "o"\n[model.demo]\nsteps = "many"\n', "model.demo.steps", "an integer"),
        ("name = [", "", "not valid TOML"),
        (GOOD.replace('name = "a"', 'name = "a b"'), "", "checkpoint name"),
    ],
)
def test_bad_spec_names_file_and_key(tmp_path, text, key, expected):
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_experiment(p)
    msg = str(err.value)
    assert str(p) in msg and expected in msg and key in msg


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_experiment(tmp_path / "none.toml")


@pytest.mark.parametrize(
    "dask, expected",
    [
        ('tls_ca_file = "ca.pem"\ntls_cert = "me.pem"\n', "only apply to an external"),
        ('scheduler = "tls://127.0.0.1:8786"\ntls_cert = "me.pem"\n', "go together"),
        ('scheduler = "tls://127.0.0.1:8786"\ntls_ca_file = "nope-ca.pem"\ntls_cert = "nope.pem"\n', "no such file"),
    ],
)
def test_dask_tls_settings_are_checked(tmp_path, dask, expected):
    p = _write(tmp_path, GOOD + "\n[dask]\n" + dask)
    with pytest.raises(SpecError, match=expected) as err:
        load_experiment(p)
    assert str(p) in str(err.value) and "dask.tls_" in str(err.value)


def test_dask_tls_files_that_exist_are_accepted(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "me.pem").write_text("x")
    dask = (f'scheduler = "tls://127.0.0.1:8786"\ntls_ca_file = "{tmp_path / "ca.pem"}"\n'
            f'tls_cert = "{tmp_path / "me.pem"}"\n')
    exp = load_experiment(_write(tmp_path, GOOD + "\n[dask]\n" + dask))
    assert exp.dask.tls_cert.endswith("me.pem")
