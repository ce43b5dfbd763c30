"""`python -m kdcore datasets|jobs`: what the app does, scripted, on the same store with the same rules."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import one_torch_thread
from kdcore import worker
from kdcore.cli import main
from kdcore.store import Store


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data_dir(tmp_path):
    return ["--data-dir", str(tmp_path / "data")]


def test_datasets_from_a_folder_and_a_zip_and_errors(synthetic_root, tmp_path, data_dir, capsys):
    code, _, err = run(capsys, "datasets", "list", *data_dir)
    assert code == 2 and "not a kdcore data directory" in err  # a typo never starts an empty store
    code, out, _ = run(capsys, "datasets", "create", "tiles", "--from", str(synthetic_root), *data_dir)
    assert code == 0 and "64 image(s) added" in out
    archive = shutil.make_archive(str(tmp_path / "tiles"), "zip", root_dir=synthetic_root.parent,
                                  base_dir=synthetic_root.name)  # everything inside one top folder
    code, out, _ = run(capsys, "datasets", "create", "zipped", "--from", archive, *data_dir)
    assert code == 0 and "64 image(s) added" in out
    code, out, _ = run(capsys, "datasets", "list", "--json", *data_dir)
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["tiles"]["train"] == rows["zipped"]["train"] == 40
    assert rows["zipped"]["test_good"] == 8 and rows["zipped"]["test_defective"] == 16

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for args, message in [(("tiles", "--from", str(synthetic_root)), "already exists"),
                          (("other", "--from", str(tmp_path / "missing")), "no such folder or zip"),
                          (("other", "--from", str(empty)), "nothing was added")]:
        code, _, err = run(capsys, "datasets", "create", *args, *data_dir)
        assert code == 2 and message in err and "Traceback" not in err
    assert [d.name for d in Store(tmp_path / "data").list_datasets()] == ["tiles", "zipped"]  # none half-made


def test_jobs_train_list_wait_evaluate_and_cancel(synthetic_root, tmp_path, data_dir, capsys):
    assert run(capsys, "datasets", "create", "tiles", "--from", str(synthetic_root), *data_dir)[0] == 0
    for args, message in [(("--dataset", "nope", "--method", "rd"), "no dataset named 'nope'"),
                          (("--dataset", "tiles", "--method", "rd", "--set", "lr=abc"), "lr must be a number"),
                          (("--dataset", "tiles", "--method", "nope"), "unknown method")]:
        code, _, err = run(capsys, "jobs", "train", *args, *data_dir)
        assert code == 2 and message in err
    code, out, _ = run(capsys, "jobs", "train", "--dataset", "tiles", "--method", "stpm", "--size", "64",
                       "--epochs", "1", "--set", "batch_size=8", *data_dir)
    train_id = int(out)
    code, _, err = run(capsys, "jobs", "wait", str(train_id), "--timeout", "0", *data_dir)
    assert code == 2 and "still queued" in err and "no worker is running" in err
    with one_torch_thread():
        assert worker.run_worker(tmp_path / "data", idle_exit_seconds=0) == 1
    code, out, _ = run(capsys, "jobs", "wait", str(train_id), *data_dir)
    assert code == 0 and "done" in out

    code, out, _ = run(capsys, "jobs", "list", "--json", *data_dir)
    (job,) = json.loads(out)
    assert set(job) == {"id", "kind", "status", "method", "dataset", "model_id", "error", "executor", "node"}
    assert (job["kind"], job["status"], job["dataset"], job["executor"]) == ("train", "done", "tiles", "local")
    code, out, _ = run(capsys, "jobs", "evaluate", str(job["model_id"]), *data_dir)
    evaluate_id = int(out)
    code, out, _ = run(capsys, "jobs", "cancel", str(evaluate_id), *data_dir)
    assert code == 0 and "cancelled" in out
    code, out, _ = run(capsys, "jobs", "wait", str(evaluate_id), *data_dir)
    assert code == 1 and "cancelled" in out
