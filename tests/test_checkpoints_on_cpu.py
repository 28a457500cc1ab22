"""Checkpoint retention and the atomic HF export, with a real DeepSpeed learner on Ray.

drivers.train.save_checkpoint is the driver's own checkpoint sequence (Run.checkpoint calls it):
DeepSpeed state + HF export per tag, state.json, the checkpoints/hf link, retention.
"""
import json
from pathlib import Path

import pytest
import torch

from actors.learner import Learner, prune_checkpoints
from learner_args import learner_kwargs
from test_learner_on_cpu import LOSS, OPT, make_batch, shard


def _group(cls, model_path):
    from drivers.ray_utils import ActorGroup

    return ActorGroup(cls, 1, name="learner-ckpt", kwargs_fn=lambda r, addr, port: learner_kwargs(
        model_path=model_path, rank=r, world_size=1, master_addr=addr, master_port=port, zero_stage=2,
        micro_batch_tokens=40, **OPT, **LOSS))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _tags(ckpt: Path) -> list[str]:
    return sorted((p.name for p in ckpt.iterdir() if p.name.startswith("step")), key=lambda n: int(n[4:]))


def _hf_weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].detach(), b[n].detach()) for n in a)


def test_keep_2_of_6_checkpoints_and_a_kill_during_export_leaves_a_loadable_model(
        ray_session, tiny_model_path, tmp_path):
    from drivers.train import save_checkpoint

    ray = ray_session

    class DiesDuringExport(Learner):
        """A learner whose next HF export is cut half way by SIGKILL of its own process."""

        def arm(self):
            self.die_in_export = True

        def _write_hf(self, directory):
            super()._write_hf(directory)
            if getattr(self, "die_in_export", False):
                import os
                import signal

                weights = Path(directory) / "model.safetensors"
                with open(weights, "r+b") as f:
                    f.truncate(weights.stat().st_size // 2)     # half the tensors on disk
                os.kill(os.getpid(), signal.SIGKILL)

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    batch = make_batch(tiny_model_path, seed=3)
    state = {"step": 0}
    sizes = []
    group = _group(DiesDuringExport, tiny_model_path)
    try:
        for step in range(1, 7):
            group.get(group.call_each("train_step", shard(batch, 1)))
            state["step"] = step
            save_checkpoint(group, ckpt, f"step{step}", state, keep=2)
            sizes.append(_du(ckpt))
        weights6 = group.get(group.call("get_state_dict"))[0]
        # 6 checkpoints, 2 kept; disk use stays at two checkpoints' worth
        assert _tags(ckpt) == ["step5", "step6"]
        assert json.loads((ckpt / "state.json").read_text())["tag"] == "step6"
        assert (ckpt / "hf").is_symlink() and (ckpt / "hf").resolve() == (ckpt / "step6" / "hf").resolve()
        assert _same(_hf_weights(ckpt / "hf"), weights6)
        one = _du(ckpt / "step6")
        print(f"one checkpoint {one / 1e6:.1f} MB; the folder after each of 6: "
              f"{[round(s / 1e6, 1) for s in sizes]} MB")
        assert max(sizes[1:]) <= 2 * one * 1.05 and sizes[-1] <= sizes[1] * 1.05

        # the 7th checkpoint: the learner process is killed half way through the HF export
        group.get(group.call("arm"))
        group.get(group.call_each("train_step", shard(batch, 1)))
        state["step"] = 7
        with pytest.raises(ray.exceptions.RayActorError):
            save_checkpoint(group, ckpt, "step7", state, keep=2)
    finally:
        group.kill()
    assert (ckpt / "step7" / "hf.tmp" / "model.safetensors").exists()   # the half-written export
    assert not (ckpt / "step7" / "hf").exists()
    assert json.loads((ckpt / "state.json").read_text())["tag"] == "step6"
    assert _same(_hf_weights(ckpt / "hf"), weights6)                     # still the step-6 model, whole

    # resume from state.json's tag; the next checkpoint replaces the broken one and prunes
    group = _group(Learner, tiny_model_path)
    try:
        client = group.get(group.call("load_checkpoint", str(ckpt), "step6"))[0]
        assert client["driver"]["step"] == 6
        assert _same(group.get(group.call("get_state_dict"))[0], weights6)
        group.get(group.call_each("train_step", shard(batch, 1)))
        save_checkpoint(group, ckpt, "step7", {"step": 7}, keep=2)
        weights7 = group.get(group.call("get_state_dict"))[0]
    finally:
        group.kill()
    assert _tags(ckpt) == ["step6", "step7"] and not (ckpt / "step7" / "hf.tmp").exists()
    assert _same(_hf_weights(ckpt / "hf"), weights7)


def test_prune_checkpoints_by_hand(tmp_path):
    for name in ("step2", "step10", "step9", "step30", "final", "hf"):
        (tmp_path / name).mkdir()
    # keep 2 at step10: step9 stays; step2 goes; step30 (newer than the state's tag: a crashed
    # run's leftover) goes; names that are not step<N> are never touched
    assert sorted(prune_checkpoints(tmp_path, 2, "step10")) == ["step2", "step30"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "hf", "step10", "step9"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(tmp_path, 0, "step10")


def test_atomic_folder_write_by_hand(tmp_path):
    from actors.learner import write_dir_atomically

    def model(text):
        def write(folder):
            folder.mkdir()
            (folder / "config.json").write_text(text)
        return write

    final = tmp_path / "hf"
    write_dir_atomically(final, model("v1"))
    write_dir_atomically(final, model("v2"))
    assert (final / "config.json").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # a crash between the two renames left only hf.old (the complete previous model): put back
    final.rename(tmp_path / "hf.old")

    def crash(folder):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_dir_atomically(final, crash)
    assert (final / "config.json").read_text() == "v2"
    # a folder of the user's files is refused, not replaced
    data = tmp_path / "work"
    data.mkdir()
    (data / "sft.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not an HF model folder"):
        write_dir_atomically(data, model("v1"))
    assert (data / "sft.jsonl").read_text() == "{}\n" and not (data / "config.json").exists()
    from drivers.sft import run_sft

    with pytest.raises(FileExistsError, match="not an HF model folder"):   # before anything starts
        run_sft("no-model", str(data / "sft.jsonl"), str(data))
    assert sorted(p.name for p in data.iterdir()) == ["sft.jsonl"]
