"""Stop signals as schedulers send them: SIGTERM, SIGINT, SIGHUP, to the main process or to the whole process
group (DataLoader workers too), at random steps. Each stop checkpoints its step, says so in one line, exits
with 128 + the signal, and the resumed run ends bit-identical to an uninterrupted one. A loader worker killed
alone does the same with exit code 2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file

from conftest import children, wait_stopped, write_domains
from conftest import finetune_command as _cmd
from conftest import finetune_paused_at as paused_at
from conftest import subprocess_env as _env
from gmixout_cli.training.checkpoint import CHECKPOINT, read_checkpoint_meta

pytestmark = pytest.mark.slow

ARGS = ["--model", "timm:test_efficientnet", "model.weights=random", "data.image_size=32", "train.epochs=4",
        "train.batch_size=8", "data.num_workers=2", "train.log_every=1", "train.lr=1e-3", "train.checkpoint_every=1000",
        "train.deterministic=true", "train.warmup_steps=2", "method.p=0.8", "method.k=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, int]:
    """The data, and the model and step count of an uninterrupted run."""
    data = write_domains(tmp_path_factory.mktemp("data")) / "src"
    out = tmp_path_factory.mktemp("ref") / "whole"
    done = subprocess.run(_cmd("--data", str(data), *ARGS, "--out", str(out)), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = json.loads((out / "results.json").read_text())["steps"]
    return data, (out / "model.safetensors").read_bytes(), steps


# every signal once and both deliveries: the main process has one handler for all three, and its loader workers
# treat SIGTERM (exit quietly) and SIGINT/SIGHUP (ignored) apart, so the group cases cover SIGTERM and SIGHUP
@pytest.mark.parametrize(("sig", "delivery"), [(signal.SIGTERM, "group"), (signal.SIGINT, "main"),
                                               (signal.SIGHUP, "group")], ids=lambda v: getattr(v, "name", v))
def test_stop_signal_checkpoints_the_step_and_resumes_bit_identically(
        tmp_path: Path, reference: tuple[Path, bytes, int], sig: signal.Signals, delivery: str) -> None:
    data, model_bytes, total = reference
    run = tmp_path / "run"
    at = random.Random(f"{sig.name}-{delivery}").randint(2, total - 3)
    # a session of its own, as a job under a scheduler: killpg reaches the loader workers as well
    proc = subprocess.Popen(paused_at(at, "--data", str(data), *ARGS, "--out", str(run)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_stopped(proc)  # held after step `at`; the signal waits for the SIGCONT, as one sent mid-step would
    os.killpg(proc.pid, sig) if delivery == "group" else proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    step = read_checkpoint_meta(run / CHECKPOINT)["step"]
    assert lines[0].startswith(f"stopped by {sig.name} at step {step}; checkpoint {run / CHECKPOINT}")
    assert f"--resume {run}" in lines[0] and at <= step < total
    assert not (run / "model.safetensors").exists() and not list(run.glob(".*.tmp"))

    resumed = subprocess.run(_cmd("--resume", str(run)), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step}" in resumed.stdout
    assert (run / "model.safetensors").read_bytes() == model_bytes
    assert not (run / CHECKPOINT).exists()


def test_second_run_on_the_same_folder_is_refused_while_the_first_trains(
        tmp_path: Path, reference: tuple[Path, bytes, int]) -> None:
    data, model_bytes, _ = reference
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd("--data", str(data), *ARGS, "--out", str(run)), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # held mid-training while the second one starts
    try:
        second = subprocess.run(_cmd("--data", str(data), *ARGS, "--resume", "auto", "--out", str(run)),
                                env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"run folder {run} is in use by another gmixout process (pid {first.pid})" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (run / "model.safetensors").read_bytes() == model_bytes  # the refused run changed nothing


# one worker alone: SIGKILL as the out-of-memory killer sends it (torch would raise mid-step), SIGTERM as a
# stray `kill` (the worker exits quietly and the loader finds it gone at its next fetch)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_a_killed_loader_worker_checkpoints_the_last_step_and_resumes_bit_identically(
        tmp_path: Path, reference: tuple[Path, bytes, int], sig: signal.Signals) -> None:
    data, model_bytes, total = reference
    run = tmp_path / "run"
    # the first half: each worker still owes many batches (it prefetches two ahead; one killed after its last
    # batch of the run is never missed)
    at = random.Random(f"worker-{sig.name}").randint(2, total // 2)
    proc = subprocess.Popen(paused_at(at, "--data", str(data), *ARGS, "--out", str(run)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_stopped(proc)
    workers = children(proc.pid)  # its DataLoader workers
    killed = workers[0] if workers else 0
    if killed:
        os.kill(killed, sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert killed and proc.returncode == 2, f"{at} of {total} steps: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    step = read_checkpoint_meta(run / CHECKPOINT)["step"]
    assert lines[0].startswith(f"error: a data loader worker (pid {killed}) exited unexpectedly at step {step}"), err
    assert f"checkpoint {run / CHECKPOINT}" in lines[0] and f"--resume {run}" in lines[0] and at <= step < total
    assert not (run / "model.safetensors").exists() and not list(run.glob(".*.tmp"))

    # as the message suggests, with one worker fewer: the batches, hence the weights, stay the same
    resumed = subprocess.run(_cmd("--resume", str(run), "data.num_workers=1"), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0 and "not used" not in resumed.stderr, resumed.stderr
    assert "num_workers: 1" in (run / "config.yaml").read_text()
    ours, whole = load_file(run / "model.safetensors"), load(model_bytes)  # the metadata holds the config
    assert ours.keys() == whole.keys() and all(torch.equal(ours[k], whole[k]) for k in ours)


def test_worker_deaths_stay_held_between_epochs_and_torchs_handler_comes_back_after_training() -> None:
    import signal

    from gmixout_cli.utils.signals import worker_deaths_between_steps

    def torch_like(signum: int, frame: object) -> None:  # what the loader's first iter installs
        raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")

    before = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        with worker_deaths_between_steps():  # the training loop
            signal.signal(signal.SIGCHLD, torch_like)  # the first epoch's iter(loader)
            with worker_deaths_between_steps():  # its batches
                assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL
            assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL  # between epochs: still held
            with worker_deaths_between_steps():
                pass
            assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGCHLD) is torch_like  # evaluation gets torch's handler back
    finally:
        signal.signal(signal.SIGCHLD, before)


class _FakeWorker:
    def __init__(self, pid: int, alive_checks: int) -> None:
        self.pid, self.alive_checks = pid, alive_checks

    def is_alive(self) -> bool:  # alive for a few polls, as a killed worker is until the kernel reaps it
        self.alive_checks -= 1
        return self.alive_checks >= 0


class _FakeLoaderIter:
    """torch's multi-process loader iterator as the main process sees it when a batch fails in transit."""

    def __init__(self, workers: list[_FakeWorker], error: BaseException) -> None:
        self._workers, self.error, self.sent = workers, error, 0

    def __iter__(self) -> _FakeLoaderIter:
        return self

    def __next__(self) -> int:
        self.sent += 1
        if self.sent == 3:
            raise self.error
        return self.sent


def test_a_batch_lost_in_transit_with_its_worker_is_a_worker_loss_and_other_errors_pass_unchanged() -> None:
    from gmixout_cli.utils.signals import is_worker_loss, worker_losses_named

    reset = ConnectionResetError(104, "Connection reset by peer")  # the fd of a batch its killed worker served
    got = []
    with pytest.raises(RuntimeError) as lost:
        for batch in worker_losses_named(_FakeLoaderIter([_FakeWorker(41, 100), _FakeWorker(42, 3)], reset)):
            got.append(batch)
    assert got == [1, 2] and is_worker_loss(lost.value) and "(pid(s) 42)" in str(lost.value)
    assert lost.value.__cause__ is reset

    # every worker alive (a dataset's own OSError, re-raised by torch): passed on as it is, after a short look
    own = OSError("disk read error")
    with pytest.raises(OSError) as passed:
        list(worker_losses_named(_FakeLoaderIter([_FakeWorker(41, 10**6)], own), wait_s=0.2))
    assert passed.value is own
    with pytest.raises(EOFError):  # no workers at all (num_workers=0): nothing to blame
        list(worker_losses_named(_FakeLoaderIter([], EOFError()), wait_s=0.2))
    assert list(worker_losses_named(range(3))) == [0, 1, 2]
