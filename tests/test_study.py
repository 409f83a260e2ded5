"""`auxpar study`: grid expansion, study-file errors, commands, the report, and resume.

The end-to-end test runs a real two-method study on digits through the CLI (serial and
penalty at K = 2, plus a run that fails), then checks that every number in results.csv and
report.md is the one in the runs' summary.json, and that finished runs are never rerun.
"""

from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from auxpar.errors import ConfigError
from auxpar.study import QUICK_STUDY, config_differences, parse_study, quick_study, setting_tag, study_to_toml
from auxpar.report import time_split, time_to_target
from conftest import ROOT, read_summary, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def study(**methods) -> dict:
    return {"study": {"name": "t", "seeds": [0]}, "base": {"data": {"dataset": "digits"}},
            "methods": methods}


# --------------------------------------------------------------------------- expansion

def test_grid_expands_methods_k_settings_seeds_in_order():
    data = {
        "study": {"name": "g", "seeds": [0, 1], "target_acc": 0.9},
        "base": {"run": {"epochs": 3}, "data": {"dataset": "digits"}},
        "methods": {
            "serial": {},
            "penalty": {"stages": [2, 4],
                        "grid": {"coupling": {"ds_factor": [1, 2], "phases": ["parallel", "parallel:8,serial:2"]}},
                        "coupling": {"aux_dtype": "bf16"}},
        },
    }
    s = parse_study(data)
    assert s.name == "g" and s.target_acc == 0.9
    assert len(s.runs) == 2 + 2 * 2 * 2 * 2
    names = [r.name for r in s.runs]
    assert len(set(names)) == len(names)
    assert names[:4] == ["serial-s0", "serial-s1", "penalty-k2-ds1-nosph-s0", "penalty-k2-ds1-nosph-s1"]
    assert "penalty-k4-ds2-sph-p8s2-s1" in names
    r = next(r for r in s.runs if r.name == "penalty-k4-ds2-sph-p8s2-s1")
    assert (r.method, r.k, r.world, r.seed) == ("penalty", 4, 4, 1)
    assert r.settings == {"coupling.ds_factor": 2, "coupling.phases": "parallel:8,serial:2"}
    c = r.config
    assert c["run"]["method"] == "penalty" and c["run"]["seed"] == 1 and c["run"]["epochs"] == 3
    assert c["dist"]["stages"] == 4 and c["dist"]["nproc"] == 4
    assert c["coupling"]["ds_factor"] == 2 and c["coupling"]["aux_dtype"] == "bf16"
    assert c["optim"]["lr"] == 0.05  # the digits recipe under the study's settings
    serial = s.runs[0]
    assert (serial.k, serial.world, serial.config["dist"]["stages"]) == (1, 1, 1)


def test_ddp_k_is_ranks_and_labels_alias_methods(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[run]\nmethod = "serial"\nseed = 7\nepochs = 2\n[data]\ndataset = "digits"\nbatch_size = 32\n')
    data = {"study": {"config": "base.toml", "seeds": [3]},
            "methods": {"ddp": {"stages": [2]},
                        "al-damped": {"method": "al", "stages": [2], "coupling": {"mu_damping": 0.5}},
                        "mgrit": {"stages": [2], "dist": {"dp": 2}}}}
    s = parse_study(data, source=str(tmp_path / "x.toml"), base_dir=tmp_path)
    assert s.name == "x"  # the file name when [study] has no name
    by = {r.name: r for r in s.runs}
    assert set(by) == {"ddp-k2-s3", "al-damped-k2-s3", "mgrit-k2-s3"}
    ddp = by["ddp-k2-s3"]
    assert ddp.config["dist"]["stages"] == 1 and ddp.config["dist"]["nproc"] == 2 and ddp.world == 2
    assert ddp.config["run"]["seed"] == 3 and ddp.config["data"]["batch_size"] == 32  # base file read
    al = by["al-damped-k2-s3"]
    assert al.method == "al" and al.label == "al-damped" and al.config["coupling"]["mu_damping"] == 0.5
    assert by["mgrit-k2-s3"].world == 4  # K * dp processes


def test_setting_tags_are_readable():
    assert setting_tag("coupling.ds_factor", 4) == "ds4"
    assert setting_tag("coupling.phases", "parallel") == "nosph"
    assert setting_tag("coupling.phases", "parallel:8,serial:2") == "sph-p8s2"
    assert setting_tag("dist.pipeline_schedule", "gpipe") == "gpipe"
    assert setting_tag("optim.lr", 0.1) == "lr0.1"
    assert setting_tag("optim.nesterov", False) == "no-nesterov"
    assert setting_tag("optim.milestones", [60, 120]) == "milestones-60x120"


@pytest.mark.parametrize("data, message", [
    (study(sgd={}), "unknown method 'sgd'; choose one of serial, ddp, pipeline, penalty, al, mgrit"),
    (study(penalty={}), "give the stage counts K"),
    (study(penalty={"stages": [1]}), "whole numbers >= 2"),
    (study(serial={"stages": [2]}), "--method serial runs in one process"),
    (study(penalty={"stages": [2], "stage": 3}), "unknown key 'stage'; valid keys: method, stages"),
    (study(penalty={"stages": [2], "grid": {"coupling": {"ds_factr": [1, 2]}}}),
     "unknown key coupling.ds_factr (did you mean ds_factor"),
    (study(penalty={"stages": [2], "grid": {"coupling": {"ds_factor": 2}}}), "must be a non-empty list"),
    (study(penalty={"stages": [2], "grid": {"rho": [1, 2]}}), "grid key 'rho' is not section.key"),
    (study(penalty={"stages": [2], "coupling": {"rho": -1}}), "[methods.penalty] (K = 2): coupling.rho"),
    (study(serial={"run": {"seed": 1}}), "run.seed is set by the study"),
    (study(penalty={"stages": [2], "grid": {"dist": {"stages": [2, 4]}}}), "dist.stages is set by the study"),
    ({"study": {}, "base": {"optim": {"lrr": 1}}, "methods": {"serial": {}}}, "[base]: unknown key optim.lrr"),
    ({"study": {"seed": [0]}, "methods": {"serial": {}}}, "unknown key study.seed"),
    ({"study": {"target_acc": 93}, "methods": {"serial": {}}}, "as a fraction in (0, 1]"),
    ({"study": {"report_targets": [0.9, 92]}, "methods": {"serial": {}}}, "study.report_targets"),
    ({"study": {"report_targets": 0.9}, "methods": {"serial": {}}}, "give a list of test accuracies"),
    ({"sudy": {}, "methods": {"serial": {}}}, "unknown top-level key or table [sudy]"),
    ({"study": {}}, "no [methods.NAME] tables"),
    ({"study": {}, "methods": {"a": {"method": "serial"}, "b": {"method": "serial"}}}, None),
    (study(penalty={"stages": [2]}, eqt={"method": "serial", "equal_time": "al"}),
     "equal_time = 'al' names no method table"),
    (study(penalty={"stages": [2]}, eqt={"method": "serial", "equal_time": "penalty"}),
     "needs a full-length table of --method serial"),
    (study(serial={}, penalty={"stages": [2]}, e1={"method": "serial", "equal_time": "penalty"},
           e2={"method": "serial", "equal_time": "e1"}), "must name a full-length table"),
    (study(serial={}, eqt={"method": "serial", "equal_time": 3}), "equal_time names another method table"),
])
def test_bad_study_files_name_the_problem(data, message):
    if message is None:  # two tables, same runs under different labels: fine, distinct names
        assert [r.name for r in parse_study(data).runs] == ["a-s0", "b-s0"]
        return
    with pytest.raises(ConfigError) as exc:
        parse_study(data)
    assert message in str(exc.value)


def test_bad_study_file_through_the_cli(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[methods.penalty]\nstages = [2]\ngrid.coupling.ds_factr = [1, 2]\n")
    res = run_cli("study", "--config", str(f), "--dry-run", timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("auxpar: error: ") and "Traceback" not in res.stderr
    assert "ds_factr" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("study", "--config", str(tmp_path / "missing.toml"), timeout=60)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_config_differences_ignore_paths_and_launch_settings():
    a = {"run": {"out": "x", "epochs": 2, "progress": "on", "checkpoint_every": "1"},
         "dist": {"nproc": 2, "split": [3, 6], "balance": "time"}, "optim": {"lr": 0.1}}
    b = {"run": {"out": "y", "epochs": 2, "progress": "off", "checkpoint_every": ""},
         "dist": {"nproc": 1, "split": [], "balance": "time"}, "optim": {"lr": 0.1}, "new": {"k": 1}}
    assert config_differences(a, b) == []
    b["optim"]["lr"] = 0.2
    assert config_differences(a, b) == ["optim.lr: 0.1 -> 0.2"]


def test_run_state_decides_skip_resume_overwrite(tmp_path):
    from auxpar.config import config_to_toml
    from auxpar.study import run_state, train_args

    spec = parse_study(study(serial={})).runs[0]
    run_dir = tmp_path / "serial-s0"
    assert run_state(spec, run_dir) == ("new", "")
    assert "--overwrite" not in train_args(spec, tmp_path / "c.toml", run_dir, "new")
    (run_dir / "checkpoints" / "step-000000010").mkdir(parents=True)
    assert run_state(spec, run_dir)[0] == "resume"
    assert train_args(spec, tmp_path / "c.toml", run_dir, "resume")[-2:] == ["--resume", "latest"]
    (run_dir / "config.toml").write_text(config_to_toml(spec.config))
    (run_dir / "summary.json").write_text("{}")
    assert run_state(spec, run_dir) == ("complete", "")
    changed = json.loads(json.dumps(spec.config))
    changed["optim"]["lr"] = 0.5
    (run_dir / "config.toml").write_text(config_to_toml(changed))
    state, detail = run_state(spec, run_dir)
    assert state == "changed" and "optim.lr: 0.5 -> 0.05" in detail
    assert train_args(spec, tmp_path / "c.toml", run_dir, "changed")[-1] == "--overwrite"


def test_shipped_study_files_expand():
    q = tomllib.loads((ROOT / "experiments/studies/quick-digits.toml").read_text())
    assert q == QUICK_STUDY, "experiments/studies/quick-digits.toml must be the embedded quick study"
    assert tomllib.loads(study_to_toml(QUICK_STUDY)) == QUICK_STUDY  # what STUDY/study.toml holds
    assert [r.name for r in quick_study().runs] == ["serial-s0", "penalty-k2-s0", "al-k2-s0", "mgrit-k2-s0"]
    from auxpar.study import load_study

    for name, model, dataset in [("resnet56-cifar10", "resnet56", "cifar10"),
                                 ("resnet110-cifar10", "resnet110", "cifar10"),
                                 ("wrn-28-10-cifar100", "wrn-28-10", "cifar100")]:
        s = load_study(ROOT / "experiments/studies" / f"{name}.toml")
        assert len(s.runs) == 102, name
        assert {r.method for r in s.runs} == {"serial", "ddp", "pipeline", "penalty", "al", "mgrit"}
        assert {r.k for r in s.runs if r.method != "serial"} == {2, 4, 8}
        assert {r.config["model"]["name"] for r in s.runs} == {model}
        assert {r.config["data"]["dataset"] for r in s.runs} == {dataset}
        lp = [r for r in s.runs if r.method in ("penalty", "al")]
        assert {r.config["coupling"]["ds_factor"] for r in lp} == {1, 2}
        assert {r.config["coupling"]["phases"] for r in lp} == {"parallel", "parallel:8,serial:2"}
    assert len(load_study(ROOT / "experiments/studies/digits-grid.toml").runs) == 102
    fm = load_study(ROOT / "experiments/studies/fashion-resnet20.toml")
    assert len(fm.runs) == 18 and {r.config["data"]["dataset"] for r in fm.runs} == {"fashion-mnist"}
    assert {r.config["data"]["train_subset"] for r in fm.runs} == {10000}
    assert [r.name for r in fm.runs[-3:]] == ["serial-eqt-s0", "serial-eqt-s1", "serial-eqt-s2"]
    assert {(r.equal_time, r.pace) for r in fm.runs[-3:]} == {("penalty", "serial")}
    more = load_study(ROOT / "experiments/studies/fashion-resnet20-more.toml")
    assert len(more.runs) == 12 and "mgrit-k2-s0" in {r.name for r in more.runs}


def test_equal_time_runs_get_the_epochs_that_fit(tmp_path):
    from auxpar.study import equal_time_deps, resolve_equal_time

    st = parse_study({"study": {"seeds": [0, 1]}, "base": {"data": {"dataset": "digits"}, "run": {"epochs": 10},
                                                         "optim": {"lr_schedule": "multistep", "milestones": [5, 8],
                                                                   "warmup_epochs": 2}},
                      "methods": {"eqt": {"method": "serial", "equal_time": "penalty"}, "serial": {},
                                  "penalty": {"stages": [2]}}})
    # equal-time runs go last, whatever the file order; each depends on its reference and pace runs
    assert [r.name for r in st.runs] == ["serial-s0", "serial-s1", "penalty-k2-s0", "penalty-k2-s1",
                                         "eqt-s0", "eqt-s1"]
    eqt = st.runs[4]
    assert eqt.pace == "serial" and eqt.equal_time == "penalty"
    assert set(equal_time_deps(st, eqt)) == {"serial-s0", "serial-s1", "penalty-k2-s0", "penalty-k2-s1"}
    assert equal_time_deps(st, st.runs[0]) == []
    with pytest.raises(ConfigError, match=r"needs finished runs of \[methods.penalty\]"):
        resolve_equal_time(st, eqt, tmp_path)

    def done(name, secs, epochs):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"train_time_s": secs, "epochs": epochs}))

    done("serial-s0", 30.0, 10)   # 3.0 s per epoch
    done("serial-s1", 34.0, 10)   # 3.4 s per epoch: pace 3.2 s
    done("penalty-k2-s0", 16.0, 10)
    cfg, why = resolve_equal_time(st, eqt, tmp_path)
    assert cfg["run"]["epochs"] == 5 and "16.0s" in why and "5 of 10 epochs" in why  # floor(16 / 3.2)
    assert cfg["optim"]["milestones"] == [2, 4] and cfg["optim"]["warmup_epochs"] == 1  # same shape
    assert eqt.config["run"]["epochs"] == 10  # the plan is untouched
    # seed 1 has no penalty run of its own: the mean of the reference runs
    done("penalty-k2-s1", 9.5, 10)
    assert resolve_equal_time(st, st.runs[5], tmp_path)[0]["run"]["epochs"] == 2  # floor(9.5 / 3.2)
    # never longer than the full-length run, never shorter than one epoch
    (tmp_path / "runs" / "penalty-k2-s0" / "summary.json").write_text(json.dumps({"train_time_s": 99, "epochs": 10}))
    assert resolve_equal_time(st, eqt, tmp_path)[0]["run"]["epochs"] == 10
    (tmp_path / "runs" / "penalty-k2-s0" / "summary.json").write_text(json.dumps({"train_time_s": 1, "epochs": 10}))
    assert resolve_equal_time(st, eqt, tmp_path)[0]["run"]["epochs"] == 1
    # a finished equal-time run matches its plan although its epoch count differs
    from auxpar.study import run_state
    from auxpar.config import config_to_toml

    d = tmp_path / "runs" / "eqt-s0"
    d.mkdir()
    (d / "summary.json").write_text("{}")
    (d / "config.toml").write_text(config_to_toml(cfg))
    assert run_state(eqt, d)[0] == "complete"
    assert run_state(st.runs[0], d)[0] == "changed"  # a full-length run with 1 epoch is not


def test_equal_time_round_step_gives_the_steps_that_fit(tmp_path):
    """equal_time_round = "step": serial gets the steps that fit into the reference's time
    (run.max_steps, the last epoch cut short), not only whole epochs."""
    from auxpar.study import resolve_equal_time

    base = {"data": {"dataset": "digits"}, "run": {"epochs": 10},
            "optim": {"lr_schedule": "multistep", "milestones": [5, 8]}}
    st = parse_study({"study": {"seeds": [0]}, "base": base,
                      "methods": {"eqt": {"method": "serial", "equal_time": "penalty", "equal_time_round": "step"},
                                  "serial": {}, "penalty": {"stages": [2]}}})
    eqt = next(r for r in st.runs if r.label == "eqt")
    assert eqt.equal_time_round == "step" and st.runs[0].equal_time_round == "epoch"

    def done(name, secs, epochs, steps=None):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True, exist_ok=True)
        rec = {"train_time_s": secs, "epochs": epochs}
        if steps is not None:
            rec["steps"] = steps
        (d / "summary.json").write_text(json.dumps(rec))

    done("serial-s0", 32.0, 10)  # no step count (an older summary): "step" cannot use it
    done("penalty-k2-s0", 17.0, 10, 200)
    with pytest.raises(ConfigError, match=r"equal_time_round = \"step\" needs the step counts"):
        resolve_equal_time(st, eqt, tmp_path)
    done("serial-s0", 32.0, 10, 200)  # 20 steps per epoch, 0.16 s per step
    cfg, why = resolve_equal_time(st, eqt, tmp_path)
    # 17.0 / 0.16 = 106.25 -> 106 steps = 5.3 epochs: 6 epochs entered, the 6th cut after 6 steps
    assert cfg["run"]["max_steps"] == 106 and cfg["run"]["epochs"] == 6, cfg["run"]
    assert "106 steps = 5.30 of 10 epochs" in why
    assert cfg["optim"]["milestones"] == [3, 4]  # the shape over 5.3 epochs: 5 * 0.53, 8 * 0.53
    # whole epochs would floor to 5 (16.0 s): the step budget gives serial the 1.0 s left over
    st2 = parse_study({"study": {"seeds": [0]}, "base": base,
                       "methods": {"eqt": {"method": "serial", "equal_time": "penalty"},
                                   "serial": {}, "penalty": {"stages": [2]}}})
    cfg2, _ = resolve_equal_time(st2, next(r for r in st2.runs if r.label == "eqt"), tmp_path)
    assert cfg2["run"]["epochs"] == 5 and cfg2["run"]["max_steps"] == 0
    # a reference longer than the full run: the full run, no step limit
    done("penalty-k2-s0", 99.0, 10, 200)
    cfg, why = resolve_equal_time(st, eqt, tmp_path)
    assert cfg["run"]["epochs"] == 10 and cfg["run"]["max_steps"] == 0 and "10 of 10 epochs" in why
    # bad values and a rounding without equal_time are one clear error each
    with pytest.raises(ConfigError, match=r"equal_time_round = 'minute'; choose \"epoch\""):
        parse_study({"base": base, "methods": {"serial": {}, "penalty": {"stages": [2]}, "eqt": {
            "method": "serial", "equal_time": "penalty", "equal_time_round": "minute"}}})
    with pytest.raises(ConfigError, match="equal_time_round needs equal_time"):
        parse_study({"base": base, "methods": {"serial": {"equal_time_round": "step"}}})


def test_switch_jumps_read_the_first_serial_step():
    from auxpar.report import switch_jumps

    recs = [{"phase": "parallel", "train_loss": 0.2, "first_step_loss": 2.3},
            {"phase": "parallel", "train_loss": 0.16, "first_step_loss": 0.2},
            {"phase": "serial", "train_loss": 0.5, "first_step_loss": 0.84},
            {"phase": "serial", "train_loss": 0.4, "first_step_loss": 0.5},
            {"phase": "parallel", "train_loss": 0.3, "first_step_loss": 0.4},
            {"phase": "serial", "train_loss": 0.3, "first_step_loss": None}]
    assert switch_jumps(recs) == [pytest.approx(0.68)]
    assert switch_jumps([{"phase": "serial", "train_loss": 1.0, "first_step_loss": 1.0}] * 3) == []


# --------------------------------------------------------------------------- report helpers

def test_time_to_target_and_time_split():
    epochs = [{"kind": "epoch", "phase": "parallel", "test_acc": 0.5, "train_time_s": 1.0,
               "time_compute_s": [0.6, 0.8], "time_comm_s": [0.1, 0.1], "time_wait_s": [0.3, 0.1]},
              {"kind": "epoch", "phase": "serial", "test_acc": 0.95, "train_time_s": 3.0,
               "time_compute_s": [1.6, 1.8], "time_comm_s": [0.2, 0.2], "time_wait_s": [0.4, 0.2]},
              {"kind": "epoch", "phase": "parallel", "test_acc": 0.97, "train_time_s": 4.0,
               "time_compute_s": [2.2, 2.6], "time_comm_s": [0.3, 0.3], "time_wait_s": [0.7, 0.3]}]
    assert time_to_target(epochs, 0.95) == 3.0
    assert time_to_target(epochs, 0.99) is None and time_to_target(epochs, None) is None
    summary = {"train_time_s": 4.0, "phase_times_s": {"parallel": 1.9, "serial": 2.0, "reinit": 0.1},
               "time_compute_s": [2.2, 2.6], "time_comm_s": [0.3, 0.3], "time_wait_s": [0.7, 0.3]}
    sp = time_split(summary, epochs)
    assert sp["split"] and sp["serial_phase"] == pytest.approx(2.1)
    assert sum(sp[k] for k in ("compute", "comm", "wait", "serial_phase")) == pytest.approx(4.0)
    # parallel epochs only (rank means of the epoch deltas): compute 0.7 + 0.7, wait 0.2 + 0.2;
    # counting the serial epoch too would give 2.4 / 0.5
    assert sp["compute"] / sp["wait"] == pytest.approx(1.4 / 0.4)
    serial = time_split({"train_time_s": 5.0, "phase_times_s": {"serial": 5.0}}, [])
    assert serial == {"compute": 5.0, "comm": 0.0, "wait": 0.0, "serial_phase": 0.0, "split": False}


def test_time_to_accuracy_ladder_and_phase_times(tmp_path):
    """The report's time-to-accuracy table reads every target from the epoch records, with
    serial's mean time to the same target over the row's; the phase table splits a layer-parallel
    run's epochs by phase and counts its re-initializations."""
    from auxpar.report import accuracy_ladder, analyse, phase_epochs, write_ladder_and_phases
    from auxpar.study import parse_targets

    def ep(phase, acc, t, dt, reinit=0.0):
        return {"kind": "epoch", "phase": phase, "test_acc": acc, "train_time_s": t, "epoch_time_s": dt,
                "reinit_time_s": reinit}

    def rec(name, method, k, epochs):
        return {"name": name, "label": method, "method": method, "k": k, "world": k, "settings": {},
                "status": "complete", "epoch_records": epochs,
                "summary": {"train_time_s": epochs[-1]["train_time_s"], "final_test_acc": epochs[-1]["test_acc"],
                            "epochs": len(epochs)}}

    serial = [rec(f"serial-s{i}", "serial", 1, [ep("serial", 0.80, 10.0, 10.0), ep("serial", 0.90, 20.0, 10.0),
                                                 ep("serial", 0.92 - 0.01 * i, 30.0, 10.0)]) for i in range(2)]
    pen = [rec("penalty-k2-s0", "penalty", 2, [ep("serial", 0.85, 7.0, 7.0), ep("parallel", 0.91, 14.0, 5.0, 2.0),
                                               ep("parallel", 0.93, 19.0, 5.0)])]
    a = analyse(serial + pen, 0.91)
    rows = {r["group"]["method"]: r["cells"] for r in accuracy_ladder(a, [0.90, 0.91, 0.92])}
    # serial: 0.90 at 20 s (both seeds), 0.91 at 30 s (seed 0 only: 0.92 and 0.91), 0.92 by seed 0 only
    assert [(c["time"], c["n"]) for c in rows["serial"]] == [(20.0, 2), (30.0, 2), (30.0, 1)]
    assert [(c["time"], c["n"], c["speedup"]) for c in rows["penalty"]] == [
        (14.0, 1, pytest.approx(20 / 14)), (14.0, 1, pytest.approx(30 / 14)), (19.0, 1, pytest.approx(30 / 19))]
    assert phase_epochs(pen[0]["epoch_records"]) == {"parallel": [5.0, 5.0], "serial": [7.0], "reinit": [2.0]}
    text = "\n".join(write_ladder_and_phases(a, [0.90, 0.91, 0.92]))
    assert "| penalty K=2 | 14.0 (1/1), 1.43x | 14.0 (1/1), 2.14x | 19.0 (1/1), 1.58x |" in text
    # serial's epoch 10 s: parallel epochs 2.00x, serial ones 1.43x; one re-initialization per run
    assert "| penalty K=2 | 5.0 (2/run) | 2.00 | 7.0 (1/run) | 1.43 | 2.0 (1/run) |" in text
    assert "not reached (0/2)" in "\n".join(write_ladder_and_phases(a, [0.95]))
    assert parse_targets("0.92,0.9", "--targets") == [0.9, 0.92]
    with pytest.raises(ConfigError, match="--targets"):
        parse_targets("90%", "--targets")


# --------------------------------------------------------------------------- commands

def test_print_commands_and_dry_run(tmp_path, capsys):
    from auxpar.cli import main

    def cli(*args):
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    f = tmp_path / "s.toml"
    f.write_text('[study]\nname = "pc"\nseeds = [0, 1]\n[base.data]\ndataset = "digits"\n'
                 '[methods.serial]\n[methods.penalty]\nstages = [2, 4]\n[methods.ddp]\nstages = [2]\n')
    out = tmp_path / "pc"
    code, stdout, err = cli("study", "--config", str(f), "--out", str(out), "--dry-run")
    assert code == 0, err
    assert "study pc: 8 runs" in stdout and "new         penalty-k4-s1" in stdout
    assert not out.exists()  # a dry run writes nothing
    code, stdout, err = cli("study", "--config", str(f), "--out", str(out), "--print-commands")
    assert code == 0, err
    lines = [ln for ln in stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 8
    assert (f"python -m auxpar train --config {out}/configs/serial-s0.toml --out {out}/runs/serial-s0 "
            "--resume latest") in lines
    assert (f"torchrun --standalone --nproc_per_node=4 -m auxpar train --config {out}/configs/penalty-k4-s1.toml "
            f"--out {out}/runs/penalty-k4-s1 --resume latest") in lines
    assert any(ln.startswith("torchrun --standalone --nproc_per_node=2 -m auxpar train --config "
                             f"{out}/configs/ddp-k2-s0.toml") for ln in lines)
    assert (out / "commands.sh").read_text() == stdout
    cfg = tomllib.loads((out / "configs" / "penalty-k4-s1.toml").read_text())
    assert cfg["run"]["method"] == "penalty" and cfg["dist"]["stages"] == 4 and cfg["run"]["seed"] == 1
    assert cfg["run"]["out"] == str(out / "runs" / "penalty-k4-s1")
    plan = json.loads((out / "study.json").read_text())
    assert len(plan["runs"]) == 8 and (out / "study.toml").read_text() == f.read_text()
    # a complete run is listed as such, not printed again
    done = out / "runs" / "serial-s1"
    done.mkdir(parents=True)
    (done / "config.toml").write_text((out / "configs" / "serial-s1.toml").read_text())
    (done / "summary.json").write_text("{}")
    code, stdout, err = cli("study", "--config", str(f), "--out", str(out), "--print-commands", "--only", "serial-*")
    assert stdout.splitlines()[2:4] == [
        f"python -m auxpar train --config {out}/configs/serial-s0.toml --out {out}/runs/serial-s0 --resume latest",
        "# complete: serial-s1"]
    code, stdout, err = cli("study", "--config", str(f), "--out", str(out), "--only", "nothing-*", "--dry-run")
    assert code == 2 and "matches no run" in err


# --------------------------------------------------------------------------- end to end

def _md_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table after ``heading``."""
    part = text.split(heading, 1)[1]
    rows = []
    for line in part.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]  # without header and separator


@pytest.mark.slow
def test_study_end_to_end_report_equals_summaries_and_resume(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text(f"""
[study]
name = "tiny"
seeds = [0]
target_acc = 0.5

[base.run]
epochs = 2
threads = 1

[base.data]
dataset = "digits"

[methods.serial]

[methods.penalty]
stages = [2]

[methods.serial-eqt]      # serial cut to the epochs that fit into penalty's training time
method = "serial"
equal_time = "penalty"

[methods.broken]          # fails at start: no CIFAR-10 here and downloads are off
method = "serial"
data.dataset = "cifar10"
data.download = false
data.data_dir = "{tmp_path / 'nodata'}"
""")
    out = tmp_path / "tiny"
    # 1. only the serial run
    res = run_cli("study", "--config", str(f), "--out", str(out), "--only", "serial-s*", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    serial_dir = out / "runs" / "serial-s0"
    first = (serial_dir / "summary.json").read_text()
    mtime = (serial_dir / "summary.json").stat().st_mtime_ns
    assert not (out / "runs" / "penalty-k2-s0").exists()

    # 2. the whole study: serial is complete and skipped, penalty runs, broken fails and is reported
    res = run_cli("study", "--config", str(f), "--out", str(out), timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "skipped serial-s0: already complete" in res.stderr
    assert "FAILED broken-s0" in res.stderr and "cifar" in res.stderr.lower()
    assert "done penalty-k2-s0" in res.stderr
    assert (serial_dir / "summary.json").stat().st_mtime_ns == mtime
    assert (serial_dir / "summary.json").read_text() == first
    assert "1 complete, 2 done, 1 failed" in res.stdout
    eqt = read_summary(out / "runs" / "serial-eqt-s0")
    assert "serial-eqt-s0: equal time to [methods.penalty]" in res.stderr
    assert 1 <= eqt["epochs"] <= 2  # 2-epoch runs: penalty's time holds one or two serial epochs
    assert f"= {eqt['epochs']} of 2 epochs" in (out / "configs" / "serial-eqt-s0.toml").read_text()
    # the printed table: one line per method with the summary's accuracy
    s_ser, s_pen = read_summary(serial_dir), read_summary(out / "runs" / "penalty-k2-s0")
    table = res.stdout.split("\n\n")[0]
    assert re.search(rf"^serial\s+1\s+1\s+-\s+1\s+{100 * s_ser['final_test_acc']:.2f}\s", table, re.M), table
    assert re.search(rf"^penalty\s+2\s+2\s+-\s+1\s+{100 * s_pen['final_test_acc']:.2f}\s", table, re.M), table

    # results.csv: the summaries' numbers, unrounded
    rows = {r["name"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"serial-s0", "penalty-k2-s0", "serial-eqt-s0", "broken-s0"}
    assert rows["serial-eqt-s0"]["equal_time"] == "penalty"
    assert rows["broken-s0"]["status"] == "missing" and rows["broken-s0"]["final_test_acc"] == ""
    for name, s in (("serial-s0", s_ser), ("penalty-k2-s0", s_pen)):
        r = rows[name]
        assert r["status"] == "complete"
        for key in ("final_test_acc", "best_test_acc", "train_time_s", "wall_time_s"):
            assert float(r[key]) == s[key], (name, key)
        for key in ("comm_bytes", "aux_store_bytes", "peak_memory_bytes", "params", "steps"):
            assert int(r[key]) == s[key], (name, key)
        assert float(r["speedup_vs_serial"]) == s_ser["train_time_s"] / s["train_time_s"]
        split = sum(float(r[f"split_{k}_s"]) for k in ("compute", "comm", "wait", "serial_phase"))
        assert split == pytest.approx(s["train_time_s"])
        epochs = [json.loads(ln) for ln in open(out / "runs" / name / "metrics.jsonl") if '"epoch"' in ln]
        hit = next((e["train_time_s"] for e in epochs if e["test_acc"] is not None and e["test_acc"] >= 0.5), None)
        assert (float(r["time_to_target_s"]) if r["time_to_target_s"] else None) == hit
    assert int(rows["penalty-k2-s0"]["comm_bytes"]) > 0 and int(rows["penalty-k2-s0"]["aux_store_bytes"]) > 0

    # report.md: per-method tables and the all-runs table show the same numbers, rounded
    md = (out / "report.md").read_text()

    def shown(s):
        return [f"{100 * s['final_test_acc']:.2f}", f"{100 * s['best_test_acc']:.2f}", f"{s['train_time_s']:.2f}"]

    for label, s in (("serial", s_ser), ("penalty", s_pen)):
        (row,) = _md_rows(md, f"### {label}\n")
        assert [row[4], row[6], row[7]] == shown(s), (label, row)
        gap = 100 * (s["final_test_acc"] - s_ser["final_test_acc"])
        assert row[5] == f"{gap:+.2f}"
        assert row[8] == f"{s_ser['train_time_s'] / s['train_time_s']:.2f}"
        ttt = rows[label + ("-s0" if label == "serial" else "-k2-s0")]["time_to_target_s"]
        assert row[9] == (f"{float(ttt):.2f}" if ttt else "not reached")
        assert row[10] == "n/a"  # no SPH switch in 2 epochs of parallel:2,serial:1
        assert row[11:14] == [f"{s['comm_bytes'] / 1e6:.2f}", f"{s['aux_store_bytes'] / 1e6:.2f}",
                             f"{s['peak_memory_bytes'] / 1e6:.2f}"]
    (row,) = _md_rows(md, "### serial-eqt")
    assert row[2] == f"equal time to penalty ({eqt['epochs']} ep)"
    runs = {r[0]: r for r in _md_rows(md, "## All runs")}
    assert set(runs) == {"serial-s0", "penalty-k2-s0", "serial-eqt-s0"}
    for name, s in (("serial-s0", s_ser), ("penalty-k2-s0", s_pen)):
        assert runs[name][5:8] == shown(s)
        assert runs[name][8] == f"{s['wall_time_s']:.2f}"
    assert "| broken-s0 | missing |" in md
    assert "communication against DS factor: skipped" in md  # no DS variation: noted, not drawn
    for png in ("accuracy_vs_time.png", "speedup_vs_k.png", "time_split.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"plots/{png}" in md
    assert not (out / "plots" / "comm_vs_ds.png").exists()

    # 3. --report-only regenerates the same report from the directory
    (out / "report.md").unlink()
    (out / "results.csv").unlink()
    res = run_cli("study", "--report-only", str(out), timeout=60)
    assert res.returncode == 0, res.stderr
    assert (out / "results.csv").is_file()
    assert _md_rows((out / "report.md").read_text(), "## All runs") == _md_rows(md, "## All runs")

    # 4. a finished run whose config no longer matches the study is reported, not replaced
    f.write_text(f.read_text().replace("epochs = 2", "epochs = 3"))
    res = run_cli("study", "--config", str(f), "--out", str(out), "--only", "serial-s*", timeout=60)
    assert res.returncode == 1
    assert "conflict serial-s0" in res.stderr and "run.epochs: 2 -> 3" in res.stderr
    assert "--rerun-changed" in res.stderr
    assert (serial_dir / "summary.json").read_text() == first
    assert "| serial-s0 | stale |" in (out / "report.md").read_text()
