"""examples/: the launch scripts run (tiny sizes, CPU overrides) and write TensorBoard scalars; the
sbatch / Megatron-LM / NeMo-Bridge files are well formed and their spec part works."""

import os
import py_compile
import subprocess
from pathlib import Path

import pytest

from megatron_sparse24.mcore_compat import HAVE_MEGATRON_TRAINING

pytestmark = pytest.mark.slow
needs_megatron_lm = pytest.mark.skipif(not HAVE_MEGATRON_TRAINING,
                                       reason="the example launchers run Megatron-LM's loop (megatron-core >= 0.17)")
ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
TINY = dict(NUM_LAYERS="2", HIDDEN="64", HEADS="4", FFN="256", SEQ="64", MBS="2", GBS="4", ITERS="4", WARMUP="2",
            PRECISION="", DIST_OPT="", TRITON_INTERPRET="0", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
CPU_ARGS = ["--num-workers", "0", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
            "--vocab-size", "256", "--lr-warmup-iters", "1"]


def _run(script, tmp_path, *extra, **env):
    full_env = {**os.environ, **TINY, "SAVE": str(tmp_path / "ckpt"), **env}
    full_env.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", str(EX / script), *CPU_ARGS, *extra], env=full_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@needs_megatron_lm
def test_single_gpu_script_with_tensorboard(tmp_path):
    out = _run("train_single_gpu.sh", tmp_path)
    assert "iteration        4/       4 |" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "ckpt" / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "lm loss validation", "sparsity/sparse_layers",
                "sparsity/activation_sparsity/layer01", "sparsity/dropped_by_24/layer02",
                "sparsity/dense_feature_share/layer01"):
        assert tag in tags, (tag, sorted(tags))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4"
    # --save X --load X resumes; a longer run than the checkpoint's schedule needs Megatron-LM's choice
    longer = subprocess.run(["bash", str(EX / "train_single_gpu.sh"), *CPU_ARGS],
                            env={**os.environ, **TINY, "SAVE": str(tmp_path / "ckpt"), "ITERS": "6"},
                            capture_output=True, text=True, timeout=600)
    assert longer.returncode == 2 and "--override-opt_param-scheduler" in longer.stderr, longer.stderr[-3000:]
    again = _run("train_single_gpu.sh", tmp_path, "--override-opt_param-scheduler", ITERS="6")
    assert "iteration        6/       6 |" in again and "iteration        4/" not in again


@needs_megatron_lm
def test_one_node_torchrun_script_tp2_sp(tmp_path):
    out = _run("train_torchrun_1node.sh", tmp_path, GPUS="2", TP="2")
    assert "tensor-model-parallel size: 2" in out and "iteration        4/       4 |" in out


def test_scripts_and_snippets_are_well_formed():
    for script in ("train_single_gpu.sh", "train_torchrun_1node.sh", "train_torchrun_multinode.sh",
                   "train_slurm.sbatch", "megatron_lm/run.sh"):
        subprocess.run(["bash", "-n", str(EX / script)], check=True)
    sbatch = (EX / "train_slurm.sbatch").read_text()
    assert "--ntasks-per-node=1" in sbatch and "scontrol show hostnames" in sbatch
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in sbatch
    py_compile.compile(str(EX / "megatron_lm" / "pretrain_gpt_sparse24.py"), doraise=True)
    assert "--spec megatron_sparse24.specs SPARSE24_LAYER_SPEC" in (EX / "megatron_lm" / "run.sh").read_text()


def test_nemo_bridge_snippet_spec():
    import importlib.util

    from tests.megatron.harness import transformer_config

    spec = importlib.util.spec_from_file_location("nemo_bridge_spec", EX / "nemo_bridge_spec.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    layer = mod.LAYER_SPEC(transformer_config(), vp_stage=None)
    assert layer.submodules.mlp.params["sparse24_config"] == mod.SPARSE24
    assert hasattr(layer.submodules.self_attention.submodules, "core_attention")  # NeMo edits it in place
