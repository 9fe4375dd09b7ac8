"""scripts/slurm/pretrain.sbatch on a stand-in for Slurm: with the environment sbatch gives (and without $USER),
under `set -u` it runs the set-up's interpreter with torch.distributed.run, one rendezvous on the first node."""
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_script_launches_torch_distributed_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.args"
    fake(bin_dir, "scontrol", 'printf "node1\\nnode2\\n"')
    fake(bin_dir, "srun", f'printf "%s\\n" "$@" > {log}')
    fake(bin_dir, "scancel", "true")
    python = tmp_path / "python"
    fake(tmp_path, "python", "true")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4321", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(ROOT),
           "PYTHON": str(python)}  # no USER: the script must not need it
    done = subprocess.run(["bash", "scripts/slurm/pretrain.sbatch", "configs/tiny.yaml", "parallel.expert=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = log.read_text().split("\n")
    i = args.index(str(python))
    assert args[i:i + 3] == [str(python), "-m", "torch.distributed.run"]
    for want in ("--nnodes=2", "--nproc_per_node=4", "--rdzv_id=4321", "--rdzv_endpoint=node1:29821",
                 "pretrain.py", "configs/tiny.yaml", "checkpoint.resume=auto", "parallel.expert=2"):
        assert want in args, (want, args)


def test_sbatch_script_outside_slurm_says_so(tmp_path):
    done = subprocess.run(["bash", "scripts/slurm/pretrain.sbatch", "configs/tiny.yaml"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not inside a Slurm allocation" in done.stderr
