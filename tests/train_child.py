"""`llamaft` in a child process, optionally killed with SIGKILL at a chosen moment (fault-injection tests).

    python tests/train_child.py [--kill PHASE:STEP[@RANK]] train run.yaml key=value ...
    torchrun --nproc-per-node 2 tests/train_child.py --kill train:4@1 train run.yaml   # rank 1 only

PHASE (STEP = the optimizer step, 1-based):
  train       in the middle of step STEP (after its first forward/backward, before the update)
  save_model  while checkpoint-STEP is being written: weights on disk, optimizer/RNG/state not yet
  publish     checkpoint-STEP complete in .staging, just before it is renamed into place
  final       after the last step: adapter weights written, tokenizer files not yet (STEP ignored)

@RANK: only the process of that rank (RANK, set by the launcher) is killed; without it, every one.
SIGKILL (not an exception): no finally blocks, no atexit, nothing flushed - like `kill -9` or the OOM
killer. One torch thread so runs in different processes compute bit for bit the same.
"""

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(phase: str, step: int) -> None:
    from llamaft.train import checkpoint, recipe
    from llamaft.train.checkpoint import AtomicCheckpointTrainer

    if phase == "train":
        real_step = AtomicCheckpointTrainer.training_step

        def training_step(self, *a, **kw):
            loss = real_step(self, *a, **kw)
            if self.state.global_step + 1 == step:
                _die()
            return loss

        AtomicCheckpointTrainer.training_step = training_step
    elif phase == "save_model":
        real_opt = AtomicCheckpointTrainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir):
            if self.state.global_step == step:
                _die()
            return real_opt(self, output_dir)

        AtomicCheckpointTrainer._save_optimizer_and_scheduler = save_optimizer
    elif phase == "publish":
        real_publish = checkpoint.publish

        def publish(staged, final):
            if final.name == f"checkpoint-{step}":
                _die()
            return real_publish(staged, final)

        checkpoint.publish = publish
    elif phase == "final":
        def save_tokenizer(*a, **kw):
            _die()

        recipe.save_tokenizer = save_tokenizer
    else:
        raise SystemExit(f"unknown kill phase {phase!r}")


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    if argv[:1] == ["--kill"]:
        spec, _, rank = argv[1].partition("@")
        phase, _, step = spec.partition(":")
        if not rank or rank == os.environ.get("RANK", "0"):
            install_kill(phase, int(step or 0))
        argv = argv[2:]
    from llamaft.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
