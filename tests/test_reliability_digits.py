"""Reliability of the default job (`--mode=pipeline`, gdiff/jobs/digits.py), issue 23: a stop
request stops the job, retrained networks are sampled and scored again, and an evaluation cut
short is redone. On the tiny digits config of tests/test_pipeline.py.
"""

import json
import os
import shutil
import signal

import pytest

from gdiff import errors
from gdiff.checkpoints import locate
from gdiff.data import pipeline as data_pipeline
from gdiff.engine import manifest as manifest_lib
from gdiff.evaluation import report
from gdiff.jobs import digits
from gdiff.jobs import train as train_job
from tests.test_pipeline import STAGES
from tests.test_pipeline import tiny_config as pipeline_config

MODELS = ("conditional", "unconditional")


def tiny_config():
    """tests/test_pipeline.py's tiny job with a one-NFE solver sweep (DDIM 2, DPM-Solver 2,
    ancestral 5): each row is a sampling run of its own, and these tests need only that the
    rows are redone and rescored, not how many there are."""
    config = pipeline_config()
    config.pipeline.solver_sweep_nfe = "2"
    for name in [n for n in config.sweep.models if n not in MODELS]:  # the classifier's rows
        del config.sweep.models[name]
    return config


@pytest.fixture(scope="module")
def stopped_then_resumed(tmp_path_factory):
    """A pipeline run that receives SIGTERM during the first training step of its first stage,
    then the rerun that finishes it. Returns what happened, and the finished workdir."""
    workdir = tmp_path_factory.mktemp("digits_stopped")
    trained = []  # (workdir name, start_step, stopped_early) of every training call
    original_train, original_to_global = train_job.train, data_pipeline.to_global
    sent = []

    def train(config, workdir, **kwargs):
        result = original_train(config, workdir, **kwargs)
        trained.append((os.path.basename(workdir), result["start_step"], result["stopped_early"]))
        return result

    def to_global(batch, mesh):
        if not sent:
            sent.append(True)
            # The trainer's handler turns SIGTERM into a stop request; never kill pytest itself.
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)
        return original_to_global(batch, mesh)

    stopped = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_job, "train", train)
        mp.setattr(data_pipeline, "to_global", to_global)
        try:
            digits.run(tiny_config(), str(workdir))
        except errors.StoppedError as e:
            stopped = e
        after_stop = {
            "conditional_step": locate.locate(workdir / "conditional", "model").step,
            "present": sorted(p.name for p in workdir.iterdir()),
            "trained": list(trained),
        }
        mp.setattr(data_pipeline, "to_global", original_to_global)
        resumed = digits.run(tiny_config(), str(workdir))
    return {
        "workdir": workdir,
        "stopped": stopped,
        "after_stop": after_stop,
        "resumed": resumed,
        "trained": trained[len(after_stop["trained"]) :],
    }


def _copy(finished, tmp_path):
    """A private copy of the finished workdir, so each test changes its own."""
    workdir = tmp_path / "w"
    shutil.copytree(finished["workdir"], workdir)
    return workdir


def test_a_stop_request_stops_the_job_and_a_rerun_resumes_the_stage(stopped_then_resumed):
    # Item 3: the first stage saved and stopped; the job must stop there (exit status 3), not
    # train the others, sample the barely trained model and publish its results.
    r = stopped_then_resumed
    assert isinstance(r["stopped"], errors.StoppedError), "the stopped stage did not stop the job"
    assert r["stopped"].exit_status == errors.EXIT_STOPPED == 3
    assert "diffusion/conditional" in str(r["stopped"]) and "rerun" in str(r["stopped"])
    after = r["after_stop"]
    assert after["trained"] == [("conditional", 0, True)]
    assert after["conditional_step"] == 1
    assert after["present"] == ["conditional"], after["present"]
    # The rerun resumes the stopped stage from its checkpoint and runs the rest.
    resumed = r["resumed"]
    assert r["trained"][0] == ("conditional", 1, False)
    assert "found step 1 of 3" in resumed["redone"]["diffusion/conditional"]
    assert resumed["ran"] == list(STAGES)
    assert locate.locate(r["workdir"] / "conditional", "model").step == 3


def test_retrained_models_are_sampled_and_scored_again(stopped_then_resumed, tmp_path):
    # Item 2: more training steps change the weights (here the conditional model's alone); the
    # samples of the old weights are moved aside and drawn again, and the evaluation scores the
    # new ones. Those of the unchanged model stay as they are.
    workdir = _copy(stopped_then_resumed, tmp_path)
    samples = workdir / "samples"
    old_digests = {p.relative_to(samples): p.read_text() for p in samples.glob("*/*/*.npz.run")}
    config = tiny_config()
    config.sweep.models.conditional["train"] = {"num_steps": 4}
    unchanged = samples / "unconditional"
    unchanged_files = {p: p.stat().st_mtime_ns for p in unchanged.rglob("*")}
    out = digits.run(config, str(workdir))
    assert out["ran"] == ["diffusion/conditional", "sample", "evaluate", "solver_sweep"]
    assert out["skipped"] == ["diffusion/unconditional", "classifier", "eval_net"]
    assert "conditional: model_weights.sha256" in out["redone"]["sample"], out["redone"]
    assert "model_weights.step 3 -> 4" in out["redone"]["sample"], out["redone"]
    assert "unconditional" not in out["redone"]["sample"]
    assert "samples of conditional/scale_4" in out["redone"]["evaluate"], out["redone"]
    assert manifest_lib.read(samples / "conditional")["model_weights"]["step"] == 4
    aside = list(samples.glob("*.replaced-*"))
    assert [p.name.split(".")[0] for p in aside] == ["conditional"]
    # The solver sweep samples the conditional model: its rows too are moved aside and redrawn.
    assert "ddim_2: model_weights.sha256" in out["redone"]["solver_sweep"], out["redone"]
    solver_aside = sorted(p.name.split(".")[0] for p in samples.glob("solver_sweep/*.replaced-*"))
    assert solver_aside == sorted(out["paths"]["solver_samples"])
    assert manifest_lib.read(aside[0])["model_weights"]["step"] == 3
    assert {p: p.stat().st_mtime_ns for p in unchanged.rglob("*")} == unchanged_files
    scored = json.loads((workdir / digits.RESULTS_JSON).read_text())["scored"]
    merged = [p for paths in out["paths"]["samples"].values() for p in paths.values()]
    assert sorted(scored["samples"].values()) == sorted(
        manifest_lib.side_digest_path(p).read_text().strip() for p in merged
    )
    changed = {str(k.parent) for k, v in old_digests.items() if (samples / k).read_text() != v}
    assert changed == {"conditional/scale_0", "conditional/scale_4"}

    # Another evaluation network (other settings): it is trained again and the same samples
    # are scored again with it.
    config.pipeline.eval_classifier_steps = 6
    out = digits.run(config, str(workdir))
    assert out["ran"] == ["eval_net", "evaluate", "solver_sweep"]
    assert "steps 5 -> 6" in out["redone"]["eval_net"]
    assert out["redone"]["evaluate"] == "what it scored changed: the evaluation network"
    assert out["redone"]["solver_sweep"] == "what it scored changed: the evaluation network"
    # Now every stage is up to date.
    out = digits.run(config, str(workdir))
    assert out["ran"] == [] and out["redone"] == {}


def test_an_evaluation_cut_short_is_redone(stopped_then_resumed, tmp_path, monkeypatch):
    # Item 4: results.csv and results.json present, results.md missing (killed between the
    # writes): the stage is not done.
    workdir = _copy(stopped_then_resumed, tmp_path)
    (workdir / digits.RESULTS_MD).unlink()

    def killed(*args, **kwargs):
        raise RuntimeError("killed while writing results.md")

    # Killed again, while writing results.md: the stage's record is not left behind.
    monkeypatch.setattr(report, "write_markdown", killed)
    with pytest.raises(RuntimeError, match="killed while writing"):
        digits.run(tiny_config(), str(workdir))
    assert (workdir / digits.RESULTS_CSV).exists()
    assert not (workdir / digits.RESULTS_JSON).exists()
    monkeypatch.undo()

    out = digits.run(tiny_config(), str(workdir))
    assert out["ran"] == ["evaluate"]
    assert "results.md" in out["redone"]["evaluate"] and "results.json" in out["redone"]["evaluate"]
    for path in [
        workdir / digits.RESULTS_MD,
        workdir / digits.RESULTS_JSON,
        workdir / digits.RESULTS_CSV,
        *out["paths"]["grids"].values(),
    ]:
        assert path.exists(), path
    assert "scored" in json.loads((workdir / digits.RESULTS_JSON).read_text())
    assert out["summary"] in (workdir / digits.RESULTS_MD).read_text()
