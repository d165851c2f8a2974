"""The decoding members the end-to-end benchmarks share: GPT-2-shaped random weights, the
engines a user would pick instead of pyminigpt (transformers, transformers under
torch.compile, CTranslate2 float32 / int8, llama.cpp f32 / f16 / q8_0 / q4_0) and pyminigpt
itself, each as one `generate(ids)`.

llama.cpp runs through llama-cpp-python (the `bench` extra, which builds llama.cpp at install) on
a GGUF file that `pyminigpt export` writes from the same weights (`llama_cpp_member.py`).

CTranslate2 brings its own OpenMP runtime, whose idle threads spin against torch's: in one
process with torch it slows whichever member runs next. So it always runs in a worker process
of its own (`Ctranslate2Worker`), which the caller times through a pipe.

    python decode_peers.py serve MODEL_DIR COMPUTE_TYPE THREADS    # the worker (used internally)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# every member, in the order the reports list them; "ctranslate2-*" need the optional package
MEMBERS = [
    "transformers",
    "transformers+compile",
    "transformers+patch",
    "ctranslate2-float32",
    "ctranslate2-int8",
    "llama.cpp-f32",
    "llama.cpp-f16",
    "llama.cpp-q8_0",
    "llama.cpp-q4_0",
    "pyminigpt",
    "pyminigpt-bf16",
    "pyminigpt-int8",
    "pyminigpt-int4",
    "torchao-int8",
    "torchao-int4",
]
# the outside implementations: every member but pyminigpt's own (its model and its patch of transformers)
PEERS = tuple(m for m in MEMBERS if not m.startswith("pyminigpt") and m != "transformers+patch")
NOT_INSTALLED = "not installed"


def ctranslate2_installed() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def member_status(member: str) -> str:
    """ "ok", or why the member cannot run here ("not installed")."""
    if member.startswith("ctranslate2") and not ctranslate2_installed():
        return NOT_INSTALLED
    if member.startswith("llama.cpp") and not all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf")):
        return NOT_INSTALLED
    if member.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        return NOT_INSTALLED
    if member == "torchao-int4" and not torch.cuda.is_available():
        # torchao 0.18's Int4WeightOnlyConfig: "Requires mslk >= 1.0.0" (its GPU kernels); no CPU packing is accepted
        return "needs CUDA (torchao 0.18)"
    return "ok"


def random_gpt2(model: dict | None = None, device: str = "cpu") -> transformers.GPT2LMHeadModel:
    """transformers' GPT-2 (GPT2Config's defaults, i.e. 124M, updated by `model`) with seed-0 random
    weights, no dropout and no eos token, so every member generates exactly max_new_tokens."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**(model or {}), **NO_DROPOUT, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).to(device).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes (pyminigpt's GPT or transformers' GPT2LMHeadModel) of weights one decode step reads:
    every parameter once, but a single row of the position table. A quantized pyminigpt model reads
    its projections' quantized buffers (the LM head's included) and one row of the token table."""
    positions = model.transformer.wpe.weight
    nbytes = (
        sum(p.numel() * p.element_size() for p in model.parameters()) - positions.numel() * positions.element_size()
    )
    if getattr(model, "quantization", None) is not None:
        tokens = model.transformer.wte.weight
        nbytes -= tokens.numel() * tokens.element_size()
        nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return nbytes


def torchao_quantized(hf: transformers.GPT2LMHeadModel, bits: int) -> transformers.GPT2LMHeadModel:
    """transformers' GPT-2 with torchao's weight-only int8 / int4 quantization: what a PyTorch user tries first.

    GPT-2's projections are Conv1D, which torchao's quantize_ skips: they become nn.Linear first
    (the same weights, transposed), and the tied LM head is quantized as the nn.Linear it is.
    """
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    from transformers.pytorch_utils import Conv1D

    for module in list(hf.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(module, name, linear)
    hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())  # untie: the embedding stays fp32
    config = Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=64)
    quantize_(hf, config)
    return hf


# ---- CTranslate2 -----------------------------------------------------------------------------


def _token(i: int) -> str:
    return f"t{i}"


def save_with_synthetic_tokenizer(model: transformers.GPT2LMHeadModel, directory: Path) -> None:
    """model.save_pretrained(directory) plus a word-level tokenizer over the model's vocabulary
    ("t0" ... "t{V-1}"), which CTranslate2's converter reads beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_size = model.config.vocab_size
    tokenizer = Tokenizer(models.WordLevel({_token(i): i for i in range(vocab_size)}, unk_token=_token(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=_token(0), bos_token=_token(0), eos_token=_token(vocab_size - 1)
    )
    model.save_pretrained(directory)
    fast.save_pretrained(directory)


def ctranslate2_model_dir(model_kwargs: dict | None = None) -> Path:
    """The CTranslate2 (float32) conversion of random_gpt2(model_kwargs), converted once and cached
    under $PYMINIGPT_BENCH_CACHE (default: the temp folder); int8 is quantized when loading."""
    import ctranslate2

    key = hashlib.sha256(
        json.dumps([model_kwargs or {}, transformers.__version__, ctranslate2.__version__]).encode()
    ).hexdigest()[:12]
    cache = Path(os.environ.get("PYMINIGPT_BENCH_CACHE", Path(tempfile.gettempdir()) / "pyminigpt-bench"))
    target = cache / f"ctranslate2-gpt2-{key}"
    if not (target / "model.bin").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as hf_dir:
            save_with_synthetic_tokenizer(random_gpt2(model_kwargs), Path(hf_dir))
            # converted beside the target, then renamed: a concurrent or killed run never leaves half a model
            partial = Path(hf_dir) / "ctranslate2"
            ctranslate2.converters.TransformersConverter(hf_dir).convert(str(partial), force=True)
            if not target.exists():
                os.replace(partial, target)
    return target


def ctranslate2_options(max_new_tokens: int, do_sample: bool, top_k: int = 0, top_p: float = 1.0) -> dict:
    """generate_batch options for HF-style settings: exactly max_new_tokens, prompt left out."""
    options = {"max_length": max_new_tokens, "min_length": max_new_tokens, "include_prompt_in_result": False}
    if do_sample:  # CTranslate2's top-k 0 means the whole vocabulary, as in HF
        options.update(sampling_topk=top_k, sampling_topp=top_p, sampling_temperature=1.0)
    return options  # greedy: the default sampling_topk=1


def serve(model_dir: str, compute_type: str, threads: int) -> None:
    """The worker loop: one JSON request per stdin line -> one JSON reply per stdout line."""
    import ctranslate2

    generator = ctranslate2.Generator(
        model_dir, device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        prompts = [[_token(i) for i in row] for row in request["ids"]]
        results = generator.generate_batch(prompts, **ctranslate2_options(**request["settings"]))
        seconds = time.perf_counter() - start
        print(json.dumps({"ids": [r.sequences_ids[0] for r in results], "seconds": seconds}), flush=True)


class Ctranslate2Worker:
    """A CTranslate2 Generator in a process of its own; `generate(ids, **settings)` returns the
    prompt and the new tokens, like transformers' generate."""

    def __init__(self, model_dir: Path, compute_type: str, threads: int | None = None):
        threads = threads or torch.get_num_threads()
        command = [sys.executable, str(Path(__file__).resolve()), "serve", str(model_dir), compute_type, str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the CTranslate2 worker exited (status {self.process.wait()})")
        return json.loads(line)

    def generate(self, input_ids: torch.Tensor, **settings) -> torch.Tensor:
        self.process.stdin.write(json.dumps({"ids": input_ids.tolist(), "settings": settings}) + "\n")
        self.process.stdin.flush()
        new = torch.tensor(self._read()["ids"], dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def compiled_generate_options() -> dict:
    """generate() options of transformers' own torch.compile path: a static KV cache, whose decode
    step generate compiles (inductor, fixed shapes). Off CUDA it needs `_compile_all_devices`.
    A new batch size or cache length compiles again, so warm up at the timed shapes."""
    config = transformers.CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


# ---- every member as one generate(input_ids, max_new_tokens, do_sample, top_k, top_p) -------


def build_member(member: str, model_kwargs: dict | None = None, device: str = "cpu"):
    """(generate(input_ids, **settings) -> ids, weight bytes a decode step reads, close()) for a member.

    settings: max_new_tokens, do_sample, top_k, top_p. Raises ValueError for an unknown member and
    RuntimeError for one that cannot run here (member_status)."""
    if member not in MEMBERS:
        raise ValueError(f"member must be one of {MEMBERS}, got {member!r}")
    if member_status(member) != "ok":
        raise RuntimeError(f"{member}: {member_status(member)}")
    hf = random_gpt2(model_kwargs, device)
    if member.startswith("ctranslate2"):
        compute_type = member.removeprefix("ctranslate2-")
        worker = Ctranslate2Worker(ctranslate2_model_dir(model_kwargs), compute_type)
        # CTranslate2's int8 keeps the embeddings and the LM head int8 as well: every weight is one byte
        nbytes = weight_bytes(hf) // (4 if compute_type == "int8" else 1)
        return worker.generate, nbytes, worker.close
    if member.startswith("llama.cpp"):
        from .llama_cpp_member import LlamaCppMember

        engine = LlamaCppMember(hf, member.removeprefix("llama.cpp-"), model_kwargs)
        return engine.generate, engine.weight_bytes, engine.close
    if member.startswith("torchao"):
        hf = torchao_quantized(hf, 8 if member == "torchao-int8" else 4)

        def generate(input_ids, **settings):
            with torch.no_grad():
                return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), **settings)

        return generate, weight_bytes(random_gpt2(model_kwargs)) // (4 if member == "torchao-int8" else 7), lambda: None
    if member.startswith("transformers"):
        if member == "transformers+patch":
            import pyminigpt

            hf = pyminigpt.patch_hf_gpt2(hf)
        extra = compiled_generate_options() if member == "transformers+compile" else {}

        def generate(input_ids, **settings):
            with torch.no_grad():
                return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), **settings, **extra)

        return generate, weight_bytes(hf), lambda: None
    from pyminigpt import GPT

    model = GPT.from_hf(hf).eval()
    if member == "pyminigpt-bf16":
        model = model.to(torch.bfloat16)
    if member in ("pyminigpt-int8", "pyminigpt-int4"):
        model.quantize_(member.removeprefix("pyminigpt-"))
    return (lambda input_ids, **settings: model.generate(input_ids, **settings)), weight_bytes(model), lambda: None


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        sys.exit(__doc__)
    serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
