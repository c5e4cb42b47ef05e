"""A Lightning or Hugging Face Trainer run under torchrun (gloo, CPU) with covshift's
callback, for tests/test_distributed_frameworks.py.

    torchrun --nproc_per_node 2 tests/ddp_frameworks.py lightning|transformers FOLDER

Each rank saves what it saw into FOLDER (``rank<r>.npz``: its losses and, for Lightning,
the outputs of ``net.0``) for the test to compare with the trace ``FOLDER/trace.covshift``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def lightning(folder: Path) -> None:
    import lightning.pytorch as L

    from covshift.integrations.lightning import CovshiftCallback

    losses: list[float] = []
    outputs: list[np.ndarray] = []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.net[0].register_forward_hook(lambda m, a, out: outputs.append(out.detach().numpy().copy()))

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CovshiftCallback(folder / "trace.covshift", run="fit")])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    np.savez(folder / f"rank{trainer.global_rank}.npz", losses=losses, outputs=np.stack(outputs))


def transformers(folder: Path) -> None:
    import transformers as hf

    from covshift.integrations.transformers import CovshiftCallback

    torch.manual_seed(0)
    config = hf.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    model = hf.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (16, 16))
    args = hf.TrainingArguments(output_dir=str(folder / "out"), max_steps=3, per_device_train_batch_size=2,
                                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                ddp_backend="gloo", learning_rate=1e-2)
    trainer = hf.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                         callbacks=[CovshiftCallback(folder / "trace.covshift", run="gpt2")])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.savez(folder / f"rank{trainer.args.process_index}.npz", losses=logged)


if __name__ == "__main__":
    {"lightning": lightning, "transformers": transformers}[sys.argv[1]](Path(sys.argv[2]))
    print(f"rank {os.environ.get('RANK', 0)} done")
