"""srd never deletes or replaces what it did not write: run folders, names, `srd prune --out`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import srd.models
import srd.models.load
import srd.models.prune
import srd.recipes.pipeline
import srd.recipes.prune
import srd.recipes.train
from srd.cli import main
from srd.utils import MARKER, is_srd_folder
from tests.conftest import held_elsewhere
from tests.test_srd_run import _args, srd_data  # noqa: F401 (a fixture)


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256): the user's files before and after."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _users_folder(root: Path) -> Path:
    for name, text in {
        "notes.txt": "mine",
        "project.old/plan.md": "my plan",  # names older srd versions removed at a run's start
        ".draft.tmp": "draft",
        "deep/.x.tmp": "x",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def no_weights(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("weights were read")

    for module in (srd.models, srd.models.load, srd.models.prune, srd.recipes.prune):
        monkeypatch.setattr(module, "load_model", fail)
    for module in (srd.recipes.train, srd.recipes.pipeline):
        monkeypatch.setattr(module, "load_models", fail)


def test_a_run_never_touches_a_folder_srd_did_not_create(tmp_path, tiny_models, srd_data, no_weights, capsys):  # noqa: F811
    user = _users_folder(tmp_path / "out" / "x")  # _args: output_dir=<out>, name=x
    before = _tree(tmp_path)
    for cmd in ("run", "train", "reflect"):
        assert main(_args(cmd, tiny_models, srd_data, tmp_path / "out")) == 2, cmd
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and str(user) in lines[0] and "overwrite=true" in lines[0] and "Traceback" not in err
        assert _tree(tmp_path) == before and not (user / MARKER).exists()


def test_a_folder_in_use_is_refused_and_left_alone(tmp_path, tiny_models, srd_data, no_weights, capsys, monkeypatch):  # noqa: F811
    """Two `srd run` of one run at once (a command started again in another terminal) would mix
    their checkpoints and logs, and the second would remove the first's temporaries as stale:
    the second is one line naming the process that holds the folder; its temporary stays."""
    import os
    import subprocess
    import sys

    from srd.utils import folder_locks, lock_folder, mark_srd_folder

    run = tmp_path / "out" / "x"
    mark_srd_folder(run, "run")  # the run the other process started
    (run / ".stage.srd-tmp").mkdir()  # the other process's work in progress
    with held_elsewhere(run) as holder:  # another process holds the folder, as a running srd command does
        capsys.readouterr()
        for cmd in ("run", "train", "reflect"):
            assert main(_args(cmd, tiny_models, srd_data, tmp_path / "out")) == 2, cmd
            err = capsys.readouterr().err
            assert f"run folder {run} is in use by another srd process (pid {holder.pid})" in err, err
            assert (run / ".stage.srd-tmp").is_dir()
    # an evaluation folder another srd eval writes into: refused too, before the model loads
    import srd.eval.evaluate

    monkeypatch.setattr(srd.eval.evaluate, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    evals = tmp_path / "evals"
    mark_srd_folder(evals, "evaluation")
    with held_elsewhere(evals) as holder:
        args = ["eval", str(tiny_models["llama-student"]), "--benchmarks", str(srd_data["dev"]), "--out", str(evals)]
        assert main([*args, "--greedy", "--no-progress"]) == 2
        assert f"evaluation folder {evals} is in use by another srd process (pid {holder.pid})" in (
            capsys.readouterr().err
        )
    # once it has ended, the folder is free; a command's locks end with it, not with the process
    with folder_locks():
        lock_folder(run)
        lock_folder(run)  # again in the same command: re-entrant
    lock = f"import fcntl; fcntl.flock(open({str(run / MARKER)!r}, 'rb'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    probe = subprocess.run([sys.executable, "-c", lock])
    assert probe.returncode == 0 and os.getpid() != holder.pid


def test_overwrite_writes_into_it_and_deletes_nothing_of_the_users(tmp_path, tiny_models, srd_data):  # noqa: F811
    user = _users_folder(tmp_path / "out" / "x")
    before = _tree(user)
    assert main(_args("reflect", tiny_models, srd_data, tmp_path / "out", "overwrite=true")) == 0
    after = _tree(user)
    assert all(after.get(k) == v for k, v in before.items())  # every file of the user's, unchanged
    assert is_srd_folder(user) and (user / "reflection" / "manifest.jsonl").exists()
    # the folder is srd's now: the same command resumes without the switch
    assert main(_args("reflect", tiny_models, srd_data, tmp_path / "out")) == 0
    assert all(_tree(user).get(k) == v for k, v in before.items())


def test_a_run_folder_of_an_older_srd_resumes(tmp_path, tiny_models, srd_data):  # noqa: F811
    assert main(_args("reflect", tiny_models, srd_data, tmp_path)) == 0
    (tmp_path / "x" / MARKER).unlink()  # written before markers existed: its config.yaml says whose it is
    assert main(_args("reflect", tiny_models, srd_data, tmp_path)) == 0
    assert is_srd_folder(tmp_path / "x")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\\\b", ""])
def test_a_run_name_is_one_plain_folder_name(tmp_path, tiny_models, srd_data, name, no_weights, capsys):  # noqa: F811
    before = _tree(tmp_path)
    assert main(_args("run", tiny_models, srd_data, tmp_path / "out", f"name={name}")) == 2
    err = capsys.readouterr().err
    assert "name must be one plain folder name" in err and "Traceback" not in err
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_models, srd_data, no_weights, capsys):  # noqa: F811
    (tmp_path / "out").write_text("a file")
    assert main(_args("run", tiny_models, srd_data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "out" in err


def test_prune_out_onto_a_folder_srd_did_not_write(tmp_path, tiny_models, monkeypatch, capsys):
    out = _users_folder(tmp_path / "student")
    before = _tree(tmp_path)
    args = ["prune", "--teacher", str(tiny_models["llama-teacher"]), "--layers", "1", "--out", str(out)]
    args += ["--num-texts", "2", "--max-len", "96", "--data", str(_texts(tmp_path))]
    before = _tree(out)
    with monkeypatch.context() as m:
        for module in (srd.models, srd.models.load, srd.models.prune, srd.recipes.prune):
            m.setattr(module, "load_model", lambda *a, **k: pytest.fail("weights were read"))
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds files srd did not write" in err and "--overwrite" in err and "Traceback" not in err
    assert _tree(out) == before
    assert main([*args, "--overwrite"]) == 0  # the user asked: the pruned student replaces the folder
    assert (out / "prune.json").exists() and is_srd_folder(out) and not (out / "notes.txt").exists()
    assert main(args) == 0  # srd's student now: reused without the switch


def _texts(tmp_path: Path) -> Path:
    path = tmp_path / "texts.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w} is a word that people say often."} for w in ("hi", "yes")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_files_srd_writes_follow_the_umask(tmp_path, tiny_models, srd_data):  # noqa: F811
    """A team can read what srd wrote: files and folders get the modes any new file and folder get
    (0644 / 0755 under umask 022), not mkstemp's 0600 or mkdtemp's 0700."""
    import os

    from srd.utils import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert main(_args("reflect", tiny_models, srd_data, tmp_path)) == 0
    for p in [tmp_path / "x", *(tmp_path / "x").rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p


@pytest.mark.parametrize("exists", [True, False])
def test_the_writable_check_holds_when_the_ranks_of_a_run_make_it_at_once(tmp_path, exists):
    """Every rank of a torchrun run checks the same store folder before loading weights: checks
    made at the same moment must all pass (each probes with a file or folder of its own, never the
    store itself) and leave the disk as they found it."""
    import threading

    from srd.utils import check_writable

    errors: list[BaseException] = []
    for round_ in range(40):
        target = tmp_path / f"r{round_}" / "store"
        if exists:
            target.mkdir(parents=True)
        start = threading.Barrier(6)

        def check(target=target, start=start):
            start.wait()
            try:
                check_writable(target)
            except BaseException as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)

        threads = [threading.Thread(target=check) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if exists:
            assert target.is_dir() and not list(target.iterdir())
        else:
            assert not (tmp_path / f"r{round_}").exists()
    assert not errors, errors[:3]


def _bench(name: str):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_benchmarks_out_folder_is_its_own(tmp_path, tiny_models, no_weights):
    """process_count.py deleted its whole --out folder before running, whatever it held; the
    quality scripts wrote runs and their machines log into any --out. Now each takes only a new
    or empty folder, one it marked itself, or (the resumable quality runs) one an older version
    of it filled; the rest is one line, with nothing touched."""
    from benchmarks.common import claim_out

    users = _users_folder(tmp_path / "users")
    before = _tree(users)
    marked_run = tmp_path / "run"
    marked_run.mkdir()
    (marked_run / MARKER).write_text(json.dumps({"written_by": "srd", "kind": "run"}))
    (marked_run / "config.yaml").write_text("method: srd\n")
    process_count = _bench("process_count")
    for out, said in ((users, "holds files srd did not write"), (marked_run, "is srd's run folder")):
        with pytest.raises(SystemExit, match=said):
            process_count.main(["--preset", "cpu", "--out", str(out)])
    assert _tree(users) == before and not (users / MARKER).exists()
    assert sorted(p.name for p in marked_run.iterdir()) == [MARKER, "config.yaml"]
    quality = _bench("quality")
    args = ["--preset", "paper-cpu", "--variants", "none", f"model.student={tiny_models['llama-student']}"]
    with pytest.raises(SystemExit, match="holds files srd did not write"):
        quality.main([*args, "--out", str(users)])
    assert _tree(users) == before and not (users / "machines.jsonl").exists()

    # an older process-count folder (unmarked runs) is refused too: that script deletes runs there
    old = tmp_path / "old-process-count"
    (old / "run0").mkdir(parents=True)
    (old / "run0" / MARKER).write_text(json.dumps({"written_by": "srd", "kind": "run"}))
    with pytest.raises(SystemExit, match="delete it yourself"):
        claim_out(old, "process-count benchmark", legacy_ok=False)
    # ... while the quality runs, long and resumable, carry on in a folder an older version filled
    claim_out(old, "quality benchmark")
    legacy = tmp_path / "old-quality"
    legacy.mkdir()
    (legacy / "machines.jsonl").write_text("{}\n")
    claim_out(legacy, "quality benchmark")
    for folder in (old, legacy):
        assert json.loads((folder / MARKER).read_text()) == {"written_by": "srd", "kind": "quality benchmark"}
        claim_out(folder, "quality benchmark")  # its own, again
    with pytest.raises(SystemExit, match="is srd's quality benchmark folder, not a trl-quality benchmark folder"):
        claim_out(legacy, "trl-quality benchmark")
    older = tmp_path / "older-quality"  # runs of an srd from before folders were marked, and
    (older / "run").mkdir(parents=True)  # dev_choice.py's cache beside them
    (older / "run" / "config.yaml").write_text("name: run\noutput_dir: older\nmethod: srd\n")
    (older / "dev-rows").mkdir()
    with pytest.raises(SystemExit, match="holds files srd did not write"):
        claim_out(older, "quality benchmark")
    claim_out(older, "quality benchmark", own=("dev-rows",))
    # dev_choice.py writes its cache (dev-rows/) only into a quality folder, not another benchmark's
    theirs = tmp_path / "trl-folder"
    (theirs / "paper-cpu-fkl-s42").mkdir(parents=True)
    (theirs / "paper-cpu-fkl-s42" / "config.yaml").write_text("name: paper-cpu-fkl-s42\noutput_dir: x\nmethod: srd\n")
    claim_out(theirs, "trl-quality benchmark")
    dev_choice = ["--out", str(theirs), "--preset", "paper-cpu", "--rows", "paper", "--seeds", "42"]
    with pytest.raises(SystemExit, match="is srd's trl-quality benchmark folder, not a quality benchmark folder"):
        _bench("dev_choice").main(dev_choice)
    assert not (theirs / "dev-rows").exists()
    trl = tmp_path / "old-trl"  # an older trl_quality.py folder: its arms (unmarked) and its reflection
    for arm in ("trl", "trl+srd"):
        (trl / arm).mkdir(parents=True)
    (trl / "reflection").mkdir()
    (trl / "reflection" / MARKER).write_text(json.dumps({"written_by": "srd", "kind": "reflection"}))
    with pytest.raises(SystemExit, match="holds files srd did not write"):
        claim_out(trl, "trl-quality benchmark")
    claim_out(trl, "trl-quality benchmark", own=("trl", "trl+srd"))
    new = tmp_path / "new"
    claim_out(new, "process-count benchmark", legacy_ok=False)
    assert is_srd_folder(new)
