"""The launch/ scripts: shellcheck-clean, usage errors exit 2, and the commands they would run.

Nothing here reaches gcloud, kubectl, SLURM or a GPU: tpu_pod.sh, gke/submit.sh and
gpu_local.sh are checked through --dry-run, slurm.sbatch with a stand-in srun and local.sh.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*/*.sh"), *LAUNCH.glob("*.sbatch")])
# Arguments that need quoting on the way through ssh and bash -c.
TRICKY = ["--config", "configs/demo.py", "--config.note=a b  c", "--config.x=it's $HOME; `id`"]
GKE_VARS = {"IMAGE": "us-docker.pkg.dev/p/r/jaxcond:1", "TPU_TYPE": "tpu-v5-lite-podslice",
            "TOPOLOGY": "4x4", "NUM_HOSTS": "4", "CHIPS_PER_HOST": "4", "WORKDIR": "gs://my-bucket/runs/demo",
            "ARGS": "--config configs/demo.py --config.train.steps=10"}
GKE_OPTIONAL = ("PVC", "SERVICE_ACCOUNT")


def _env(**extra):
    """The test's environment without anything a launcher reads from it, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "JAXCOND_")) and k not in GKE_VARS
           and k not in (*GKE_OPTIONAL, "JOB_NAME")}
    return {**env, **extra}


def _run(script, *args, env=None, cwd=ROOT):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=env if env is not None else _env(), cwd=cwd, timeout=60)


def _shellcheck():
    found = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}"
                                            f"{os.environ.get('PATH', '')}")
    assert found, "shellcheck not found: install the test extra (pip install -e '.[test]')"
    return found


def _stub(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_every_launcher_is_found():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"local.sh", "tpu_pod.sh", "gpu_local.sh", "slurm.sbatch", "gke/submit.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_bash_syntax_and_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([_shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("script, args, message", [
    ("local.sh", [], None),  # no message: just the usage
    ("tpu_pod.sh", [], "--tpu and --zone are required"),
    ("tpu_pod.sh", ["--tpu", "t"], "--tpu and --zone are required"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone"], "--zone needs a value"),
    ("tpu_pod.sh", ["--tpu=", "--zone", "z"], "--tpu needs a value"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--bogus"],
     "unknown argument: --bogus (jaxcond train arguments go after --)"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--"], "no jaxcond train arguments after --"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--", "--config", "c"],
     "no --workdir: give the run directory, gs://BUCKET/path or a path every worker sees"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--", "--config", "c", "--workdir", "runs/x"],
     "--workdir runs/x: give gs://BUCKET/path or an absolute path that every worker sees"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--workdir=runs/x", "--", "--config", "c"],
     "--workdir runs/x: give gs://BUCKET/path or an absolute path that every worker sees"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--workdir=s3://b/x", "--", "--config", "c"],
     "--workdir s3://b/x: only gs:// URLs are supported (gs://BUCKET/path)"),
    ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--workdir=gs:///x", "--", "--config", "c"],
     "--workdir gs:///x names no bucket: use gs://BUCKET/path"),
    ("gke/submit.sh", ["--bogus"], "unknown argument: --bogus"),
    ("slurm.sbatch", [], "no jaxcond train arguments"),
    ("slurm.sbatch", ["--config", "c", "--workdir", "runs/x"], "submit it with sbatch"),  # not under sbatch
    ("gpu_local.sh", [], "no jaxcond train arguments"),
    ("gpu_local.sh", ["--gpus"], "--gpus needs a list like 0,1,2,3"),
    ("gpu_local.sh", ["--gpus", "0;1", "--config", "c"], "--gpus needs a list like 0,1,2,3"),
    ("gpu_local.sh", ["--gpus=0;1", "--config", "c"], "--gpus needs a list like 0,1,2,3"),
    ("gpu_local.sh", ["train", "--config", "c"], "unknown argument: train"),
])
def test_bad_arguments_exit_2_with_the_reason_and_usage_on_stderr(script, args, message):
    r = _run(LAUNCH / script, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"launch/{script}" in r.stderr  # the usage line names the script
    if message is not None:  # the first line says which check failed
        assert r.stderr.splitlines()[0] == f"{os.path.basename(script)}: {message}", r.stderr


def test_tpu_pod_dry_run_runs_train_on_all_workers_with_args_intact(tmp_path):
    r = _run(LAUNCH / "tpu_pod.sh", "--tpu", "my-tpu", "--zone", "us-central2-b", "--project", "p1",
             "--dry-run", "--", *TRICKY, "--workdir", "/shared/runs/a b")
    assert r.returncode == 0, r.stderr
    scp, ssh = (shlex.split(line) for line in r.stdout.splitlines())
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6:] == ["my-tpu:jaxcond.tgz", "--worker=all", "--zone", "us-central2-b", "--project", "p1"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert ssh[6:-1] == ["--worker=all", "--zone", "us-central2-b", "--project", "p1", "--command"]

    # Run the remote command the way a worker's shell would, against a stand-in checkout.
    _stub(tmp_path / "src/launch/local.sh",
          'printf "%s\\n" "$JAXCOND_EXTRA" "$PWD" >"$HOME/got"; printf "%s\\0" "$@" >>"$HOME/got"\n')
    subprocess.run(["tar", "-czf", str(tmp_path / "jaxcond.tgz"), "-C", str(tmp_path / "src"), "launch"],
                   check=True)
    subprocess.run(["bash", "-c", ssh[-1]], env=_env(HOME=str(tmp_path)), check=True)
    extra, cwd, argv = (tmp_path / "got").read_text().split("\n", 2)
    assert (extra, cwd) == ("tpu", str(tmp_path / "jaxcond"))
    assert argv.split("\0")[:-1] == ["train", "--distributed=on", *TRICKY, "--workdir", "/shared/runs/a b"]


@pytest.mark.parametrize("options", [["--tpu", "t", "--zone", "z", "--workdir", "/mnt/r"],
                                     ["--tpu=t", "--zone=z", "--workdir=/mnt/r"],
                                     ["--tpu", "t", "--zone", "z", "--workdir", "gs://my-bucket/runs/r"]])
def test_tpu_pod_workdir_option_is_forwarded(options):
    r = _run(LAUNCH / "tpu_pod.sh", *options, "--dry-run", "--", "--config", "configs/demo.py")
    assert r.returncode == 0, r.stderr
    ssh = shlex.split(r.stdout.splitlines()[1])
    assert ssh[5:10] == ["t", "--worker=all", "--zone", "z", "--command"]
    workdir = options[-1].split("=", 1)[-1]
    assert ssh[-1].endswith(f"train --distributed=on --config configs/demo.py --workdir {workdir}")


def _submit(tmp_path, env, *, without_envsubst=False):
    if without_envsubst:  # a PATH with only what submit.sh needs besides envsubst
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("bash", "date", "dirname", "sed"):
            (bin_dir / tool).symlink_to(shutil.which(tool))
        (bin_dir / "python3").symlink_to(sys.executable)  # an interpreter, not a wrapper script
        env = {**env, "PATH": str(bin_dir)}
    return _run(LAUNCH / "gke/submit.sh", "--dry-run", env=env)


def test_usage_examples_use_a_gs_workdir():
    """Runs on several hosts keep their run directory in a bucket by default."""
    for script in ("tpu_pod.sh", "gke/submit.sh"):
        r = _run(LAUNCH / script, "--help")
        assert r.returncode == 0 and "gs://YOUR_BUCKET/runs/" in r.stdout, r.stdout


@pytest.mark.parametrize("without_envsubst", [False, True], ids=["envsubst", "python"])
def test_gke_dry_run_renders_a_complete_jobset(tmp_path, without_envsubst):
    if not without_envsubst and not shutil.which("envsubst"):
        pytest.skip("envsubst (gettext) not installed; the python fallback is tested")
    r = _submit(tmp_path, _env(**GKE_VARS, JOB_NAME="jaxcond-test"), without_envsubst=without_envsubst)
    assert r.returncode == 0, r.stderr
    assert "${" not in r.stdout
    doc = yaml.safe_load(r.stdout)
    assert (doc["kind"], doc["metadata"]["name"]) == ("JobSet", "jaxcond-test")
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    (container,) = pod["containers"]
    assert container["image"] == GKE_VARS["IMAGE"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert shlex.split(container["command"][-1]) == [
        "exec", "jaxcond", "train", "--distributed=on", "--workdir", "gs://my-bucket/runs/demo",
        "--config", "configs/demo.py", "--config.train.steps=10"]
    assert pod["serviceAccountName"] == "default"
    assert pod["volumes"] == container["volumeMounts"] == []  # a bucket needs no claim


def test_gke_workdir_on_a_claim(tmp_path):
    env = _env(**{**GKE_VARS, "WORKDIR": "/runs/demo"}, PVC="jaxcond-runs", SERVICE_ACCOUNT="trainer")
    r = _submit(tmp_path, env)
    assert r.returncode == 0, r.stderr
    pod = yaml.safe_load(r.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "jaxcond-runs"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    assert "--workdir /runs/demo " in pod["containers"][0]["command"][-1]


def test_gke_names_every_missing_variable(tmp_path):
    r = _submit(tmp_path, _env(IMAGE="x", NUM_HOSTS="2"))
    assert r.returncode == 2
    missing = r.stderr.splitlines()[0].split(":", 2)[-1].split()
    assert missing == ["TPU_TYPE", "TOPOLOGY", "CHIPS_PER_HOST", "WORKDIR", "ARGS"]


@pytest.mark.parametrize("bad, message", [
    ({"NUM_HOSTS": "four"}, "NUM_HOSTS and CHIPS_PER_HOST must be positive integers"),
    ({"WORKDIR": "/data/x"}, "WORKDIR=/data/x: must be gs://BUCKET/path or a path under /runs (the PVC)"),
    ({"WORKDIR": "gs://"}, "WORKDIR=gs://: must be gs://BUCKET/path or a path under /runs (the PVC)"),
    ({"WORKDIR": "/runs/x"}, "WORKDIR=/runs/x: set PVC, the claim mounted at /runs (or use a gs:// WORKDIR)"),
    ({"PVC": "a}, b: {"}, "PVC=a}, b: {: not a Kubernetes claim name"),
    ({"SERVICE_ACCOUNT": "Bad Name"}, "SERVICE_ACCOUNT=Bad Name: not a Kubernetes service account name")])
def test_gke_rejects_bad_values(tmp_path, bad, message):
    r = _submit(tmp_path, _env(**{**GKE_VARS, **bad}))
    assert r.returncode == 2 and "launch/gke/submit.sh" in r.stderr
    assert r.stderr.splitlines()[0] == f"submit.sh: {message}"


def test_gpu_local_dry_run_prints_the_command():
    args = ["--config", "configs/demo.py", "--workdir", "runs/a b"]
    for gpus in (["--gpus", "0,1,2,3"], ["--gpus=0,1,2,3"]):
        r = _run(LAUNCH / "gpu_local.sh", *gpus, "--dry-run", *args)
        assert r.returncode == 0, r.stderr
        assert shlex.split(r.stdout) == ["env", "JAXCOND_EXTRA=cuda12", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                                         "bash", f"{LAUNCH}/local.sh", "train", "--distributed=off", *args]
    r = _run(LAUNCH / "gpu_local.sh", "--dry-run", *args)
    assert "CUDA_VISIBLE_DEVICES" not in r.stdout


@pytest.mark.parametrize("per_node, device_ids, cpus", [("1", "0,1,2,3", "32"), ("4", "", "8")])
def test_slurm_installs_once_then_starts_the_tasks(tmp_path, per_node, device_ids, cpus):
    # A stand-in checkout and srun: record what the batch script runs, in order.
    log = tmp_path / "log"
    _stub(tmp_path / "repo/launch/local.sh", f'echo "local.sh $* extra=$JAXCOND_EXTRA" >>{log}\n')
    _stub(tmp_path / "bin/srun", f'echo "srun $* ids=${{JAX_LOCAL_DEVICE_IDS-}}" >>{log}\n')
    env = _env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7",
               SLURM_SUBMIT_DIR=str(tmp_path / "repo"), SLURM_NTASKS_PER_NODE=per_node,
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="32")
    r = _run(LAUNCH / "slurm.sbatch", "--config", "configs/demo.py", "--workdir", "runs/x", env=env)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [
        "local.sh setup extra=cuda12",
        f"srun --ntasks-per-node={per_node} --cpus-per-task={cpus} bash launch/local.sh train "
        f"--distributed=on --config configs/demo.py --workdir runs/x ids={device_ids}"]
