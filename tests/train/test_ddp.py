"""Two-process data parallel training (gloo on CPU) equals one process with the same global batch."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pyminigpt.model import GPT, GPTConfig
from pyminigpt.tokenizer import CharTokenizer
from pyminigpt.train.data import SlidingWindowDataset, names_corpus
from pyminigpt.train.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.slow  # processes under torchrun; `make test-unit` leaves it out

SEQ_LEN, STEPS, GLOBAL_BATCH = 16, 5, 8


def setup():
    names = names_corpus(200, seed=0)
    tok = CharTokenizer.from_text(names + ["\n"])
    ids = tok.encode("\n".join(names))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # fmt: skip
    # 2 micro-batches per step: gradient accumulation runs under DDP's no_sync too
    return model, SlidingWindowDataset(ids, SEQ_LEN, 9), SlidingWindowDataset(ids[:400], SEQ_LEN)


def run(out_dir: str, world_size: int) -> Trainer:
    model, train, evals = setup()
    cfg = TrainerConfig(
        max_steps=STEPS, batch_size=GLOBAL_BATCH // (2 * world_size), grad_accum_steps=2, learning_rate=3e-3,
        warmup_steps=2, eval_interval=STEPS, out_dir=out_dir, progress=False, device="cpu",
    )  # fmt: skip
    trainer = Trainer(model, train, evals, cfg)
    trainer.train()
    return trainer


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One torchrun-like process: the Trainer joins the group from the environment."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))  # fmt: skip
    try:
        trainer = run(out_dir, world_size)
        assert dist.is_initialized() and trainer.world_size == world_size and trainer.rank == rank
        weights = {k: v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"}
        save_file(weights, os.path.join(out_dir, f"weights-rank{rank}.safetensors"))
        with open(os.path.join(out_dir, f"history-rank{rank}.json"), "w") as f:
            json.dump(trainer.history, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")
def test_two_process_ddp_matches_single_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process; tiny models gain nothing from threads
    try:
        single = run(str(tmp_path / "single"), world_size=1)
    finally:
        torch.set_num_threads(threads)

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    mp.spawn(worker, args=(2, free_port(), str(ddp_dir)), nprocs=2, join=True)

    histories = [json.loads((ddp_dir / f"history-rank{r}.json").read_text()) for r in range(2)]
    timeless = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h] for h in histories]
    assert timeless[0] == timeless[1]  # every rank logs the global loss
    ddp_losses = [r["loss"] for r in histories[0]]
    single_losses = [r["loss"] for r in single.history]
    assert len(ddp_losses) == STEPS and all(math.isfinite(x) for x in ddp_losses)
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5, rel=0)
    assert histories[0][-1]["eval_loss"] == pytest.approx(single.history[-1]["eval_loss"], abs=1e-5)

    rank_weights = [load_file(ddp_dir / f"weights-rank{r}.safetensors") for r in range(2)]
    for key, value in rank_weights[0].items():
        assert torch.equal(value, rank_weights[1][key])  # the replicas never drift apart
        torch.testing.assert_close(value, single.model.state_dict()[key], atol=1e-5, rtol=1e-4)

    # rank 0 alone wrote the checkpoints, with the RNG states of both ranks
    assert sorted(p.name for p in ddp_dir.iterdir() if p.is_dir()) == ["best", "last"]
    state = json.loads((ddp_dir / "last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert set(load_file(ddp_dir / "last" / "trainer_state.safetensors")) >= {"rng.rank0.torch", "rng.rank1.torch"}
