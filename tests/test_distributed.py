"""Several processes through torchrun (2 gloo ranks on CPU): the same weights as one process, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_ARGS, children, write_domains
from gmixout_cli.errors import UserError
from gmixout_cli.training.distributed import Dist, check_batch

# the CPU (gloo) by default, also on a GPU machine; benchmarks/gpu_job.sh sets cuda where two GPUs exist (NCCL)
DEVICE = os.environ.get("GMIXOUT_TEST_DEVICE", "cpu")
ARGS = [*TINY_ARGS, f"train.device={DEVICE}"]


def torchrun(*args: str, cwd: Path, entry: tuple[str, ...] = ("-m", "gmixout_cli")) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 -m gmixout_cli ...`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *entry, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_a_rank_takes_a_contiguous_share_and_the_batch_must_split() -> None:
    shares = [Dist(r, 3).shard(8) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 8)]
    check_batch(Dist(0, 2), 8, 4)
    with pytest.raises(UserError, match="does not split over 3 processes"):
        check_batch(Dist(0, 3), 8, None)
    with pytest.raises(UserError, match="train.micro_batch_size=3 does not divide"):
        check_batch(Dist(0, 2), 8, 3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gmixout", "full", "lora", "gmixout_bf16"])
def test_two_ranks_give_the_weights_of_one_process_with_the_same_global_batch(
        cli, tmp_path: Path, monkeypatch, method: str) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    write_domains(tmp_path / "data")
    extra = [f"method.name={method.removesuffix('_bf16')}", *(["method.k=2"] if method.startswith("gmixout") else []),
             *(["method.weight_dtype=bf16", "train.precision=bf16"] if method.endswith("_bf16") else [])]
    # one process, the global batch of 8 in two micro-batches of 4: the same sums, in the same order, as two
    # ranks of 4 whose gradients are all-reduced, so the weights agree to the last bit
    code, _, err = cli("finetune", "-d", "data/src", *ARGS, *extra, "train.micro_batch_size=4", "--out", "one")
    assert code == 0, err
    out = finished(torchrun("finetune", "-d", "data/src", *ARGS, *extra, "--out", "two", cwd=tmp_path))
    assert "2 processes, 4 images each" in out
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max().item() <= 1e-6, key
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == json.loads((tmp_path / "one" / "results.json")
                                                                          .read_text())["steps"]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    sent = records[0]["comm_bytes_per_step"]
    dense = sum(v.numel() * 4 for v in one.values() if v.dtype.is_floating_point)
    if method.startswith("gmixout"):  # about 1-p of the target entries, plus the dense head
        assert 0 < sent < 0.2 * dense
    elif method == "full":
        assert sent > 0.5 * dense


# rank 1 signals itself right after the all-reduce that decided its third step not to stop: the one moment where
# the ranks' own flags disagree about that step (a scheduler's signals reach the ranks at slightly different times)
LATE_SIGNAL = """
import os, signal
from gmixout_cli.cli.app import main
from gmixout_cli.training import distributed

agree, calls = distributed.Dist.agree, []

def late(self, loss, stop):
    out = agree(self, loss, stop)
    calls.append(out)
    if self.rank == 1 and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return out

distributed.Dist.agree = late
main()
"""


@pytest.mark.slow
def test_a_signal_to_one_rank_after_the_steps_all_reduce_stops_every_rank_after_the_next_step(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    write_domains(tmp_path / "data")
    (tmp_path / "late_signal.py").write_text(LATE_SIGNAL)
    args = ["-d", "data/src", *ARGS, "train.epochs=40", "method.name=full", "--out", "late"]
    out, _ = torchrun("finetune", *args, cwd=tmp_path, entry=("late_signal.py",)).communicate(timeout=300)
    said = [line for line in out.splitlines() if line.startswith("stopped by")]
    # before, rank 1 left after step 3 while rank 0 went on to step 4 and died in its all-reduce, with a traceback
    assert len(said) == 1 and "a stop signal to another process at step 4;" in said[0], out
    assert "]: Traceback" not in out, out  # no rank's own (torchrun reports its failed children with one)
    from gmixout_cli.training.checkpoint import read_checkpoint_meta

    assert read_checkpoint_meta(tmp_path / "late" / "checkpoint.safetensors")["step"] == 4
    out = finished(torchrun("finetune", "--resume", "late", cwd=tmp_path))
    assert "resumed" in out and (tmp_path / "late" / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_a_two_rank_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(
        cli, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    write_domains(tmp_path / "data")
    args = ["-d", "data/src", *ARGS, "train.epochs=30", "method.name=gmixout", "method.k=3"]
    proc = torchrun("finetune", *args, "train.checkpoint_every=2", "--out", "killed", cwd=tmp_path)
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [*children(proc.pid), proc.pid]:  # both ranks (torchrun puts them in sessions of their own), then it
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert checkpoint.is_file() and not (tmp_path / "killed" / "results.json").exists(), out[-3000:]

    code, _, err = cli("finetune", "--resume", "killed")  # one process cannot continue a 2-rank run
    assert code == 2 and "2 process(es), this one has 1" in err and "--nproc_per_node 2" in err

    out = finished(torchrun("finetune", "--resume", "killed", cwd=tmp_path))
    assert "resumed" in out
    code, _, err = cli("finetune", *args, "train.micro_batch_size=4", "--out", "whole")
    assert code == 0, err
    resumed, whole = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    for key in whole:
        assert (resumed[key] - whole[key]).abs().max().item() <= 1e-6, key


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step_with_a_checkpoint(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    write_domains(tmp_path / "data")
    args = ["-d", "data/src", *ARGS, "train.epochs=40", "method.name=full"]
    proc = torchrun("finetune", *args, "--out", "stopped", cwd=tmp_path)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks, as Slurm or Ctrl-C would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    said = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(said) == 1 and "torchrun --nproc_per_node 2 -m gmixout_cli finetune --resume stopped" in said[0], out
    step = int(said[0].split("at step ")[1].split(";")[0])
    from gmixout_cli.training.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(tmp_path / "stopped" / "checkpoint.safetensors")
    assert meta["step"] == step and meta["world_size"] == 2
    out = finished(torchrun("finetune", "--resume", "stopped", cwd=tmp_path))
    assert (tmp_path / "stopped" / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_a_loader_worker_killed_on_one_rank_stops_every_rank_before_the_next_step(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    write_domains(tmp_path / "data")
    args = ["-d", "data/src", *ARGS, "train.epochs=40", "method.name=gmixout", "method.k=3", "data.num_workers=1"]
    proc = torchrun("finetune", *args, "--out", "lost", cwd=tmp_path)
    metrics = tmp_path / "lost" / "metrics.jsonl"
    deadline, killed = time.monotonic() + 120, 0
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            rank1 = [p for p in children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
            workers = children(rank1[0]) if rank1 else []
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)  # as the out-of-memory killer would, on one rank only
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    assert killed and proc.returncode != 0, out[-3000:]
    said = [line for line in out.splitlines() if "exited unexpectedly at step" in line]
    # rank 1 names its worker, rank 0 learns of it through the same all-reduce; both stop after the same step
    assert any(f"(pid {killed})" in line for line in said) and any("of another rank" in line for line in said), out
    steps = {int(line.split("at step ")[1].split(" ")[0]) for line in said}
    from gmixout_cli.training.checkpoint import read_checkpoint_meta

    assert len(steps) == 1 and read_checkpoint_meta(tmp_path / "lost" / "checkpoint.safetensors")["step"] in steps
    assert "Traceback" not in out.split("exited unexpectedly")[0]
    out = finished(torchrun("finetune", "--resume", "lost", cwd=tmp_path))
    assert "resumed" in out and (tmp_path / "lost" / "results.json").is_file()
