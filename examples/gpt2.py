"""A small Hugging Face GPT-2, built from a config (nothing is downloaded), learning a
synthetic language: token sequences drawn from a fixed random Markov chain.

    pip install "covshift[transformers]"
    covshift trace examples/gpt2.py

Batches are dicts (``input_ids``, ``labels``) as Hugging Face collators make them; covshift
calls ``model(**batch)`` and trains on the loss GPT-2 returns for its labels (each position
predicts the next token). For the "bn" run covshift puts a BatchNorm over the feature
dimension after each block's ``mlp.c_fc`` (the Conv1D that feeds the GELU), the only Linear
that feeds a nonlinearity; attention, LayerNorm and the other modules are GPT-2's own and are
called in both runs. The chain makes the next token partly predictable: a model that learned
it reaches the chain's entropy (printed by ``python examples/gpt2.py``), well below the
initial ln(vocab) of a uniform guess.
"""

import math

import torch
from torch.utils.data import Dataset

VOCAB, LENGTH, TRAIN, VAL = 64, 32, 2048, 256
config = {"steps": 300, "lr": 3e-3, "batch_size": 32, "optimizer": "adam", "seed": 0}


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=4, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0))
    model.loss_type = "ForCausalLM"  # the loss GPT-2 uses anyway; named, transformers does not warn
    return model


def transitions(seed: int = 1234) -> torch.Tensor:
    """The chain: from each token, 4 likely next tokens share most of the probability."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g)
    favourites = torch.randint(VOCAB, (VOCAB, 4), generator=g)
    logits.scatter_add_(1, favourites, torch.full((VOCAB, 4), 4.0))
    return logits.softmax(1)


class Chain(Dataset):
    """``n`` sequences of ``LENGTH`` tokens as dict examples, the labels being the inputs
    (GPT-2 shifts them inside its loss)."""

    def __init__(self, n: int, seed: int) -> None:
        p = transitions()
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(VOCAB, (n,), generator=g)
        for t in range(1, LENGTH):
            ids[:, t] = torch.multinomial(p[ids[:, t - 1]], 1, generator=g)[:, 0]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def data():
    return Chain(TRAIN, seed=0), Chain(VAL, seed=1)


def entropy() -> float:
    """The chain's mean next-token entropy in nats under its stationary distribution: the
    lowest loss a model can reach."""
    p = transitions().double()
    stationary = torch.linalg.matrix_power(p, 256)[0]
    return float(-(stationary[:, None] * p * p.log()).sum())


if __name__ == "__main__":
    print(f"uniform guess: {math.log(VOCAB):.3f} nats, the chain's entropy: {entropy():.3f} nats")
